"""``streams.rouge.rouge_l`` against the reference, rouge-score's RougeScorer.

The contract is bit-identity: ``rouge_l(t, p) == RougeScorer(["rougeL"],
use_stemmer=True).score(t, p)["rougeL"].fmeasure`` for every pair of strings.
A seeded generator produces over 10,000 varied pairs (non-ASCII text, empty
and whitespace- or punctuation-only sides, identical and near-duplicate
texts, stemming words, short tokens, digits, repeated tokens, a few texts of
over 1,000 tokens); the reference's pure-Python LCS is slow on long texts, so
those are budgeted to keep the module well under a minute.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator

import pytest
from rouge_score import rouge_scorer

from streams.rouge import rouge_l, tokenize

SEED = 20240611
N_PAIRS = 12_000
N_MEDIUM = 300

_REFERENCE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def reference(target: str, prediction: str) -> float:
    return _REFERENCE.score(target, prediction)["rougeL"].fmeasure


# --- vocabulary ---------------------------------------------------------------


def _split(words: str) -> list[str]:
    return words.split()


STEMMING = _split(
    "run running runs ran runner generously generous generosity generation generated "
    "connect connected connecting connection connections happily happiness happy "
    "skies sky dying die lying tying news innings inning outings cannings proceed "
    "exceed succeed agreed agreement relational conditional rational valency "
    "digitizer conformabli radicalli differentli vileli analogousli vietnamization "
    "predication operator feudalism decisiveness hopefulness callousness formaliti "
    "sensitiviti sensibiliti triplicate formative formalize electriciti electrical "
    "hopeful goodness revival allowance inference airliner gyroscopic adjustable "
    "defensible irritant replacement adjustment dependent adoption homologou "
    "communism activate angulariti homologous effective bowdlerize probate rate "
    "cease controll roll caresses ponies ties caress cats feed plastered bled motoring "
    "sing conflated troubled sized hopping tanned falling hissing fizzed failing filing "
    "studies studying studied crying cried flies flying easily generalizations"
)
SHORT = _split(
    "a an the is of to it in on at by we us ab xy i o x y z ok no yes cat dog sat mat ran"
)
DIGITS = ["0", "1", "7", "42", "007", "123", "2024", "3.14", "1,000", "10%", "v2", "x86", "9th"]
NON_ASCII = [
    "привет",
    "мир",
    "Москва",
    "ёлка",
    "你好",
    "世界",
    "中文文本",
    "こんにちは",
    "한국어",
    "café",
    "naïve",
    "résumé",
    "Ångström",
    "crème",
    "brûlée",
    "façade",
    "São",
    "Zürich",
    "😀",
    "👍🏽",
    "🇩🇪",
    "👨\u200d👩\u200d👧",
    "İstanbul",
    "İ",
    "\u212aelvin",
    "\u212a",
    "5\u212a",
    "straße",
    "STRASSE",
    "ß",
    "ﬁnance",
    "ﬂow",
    "oﬀice",
    "ﬁ",
    "Œuvre",
    "ǅemal",
    "ＡＢＣ",
    "ｒｕｎｎｉｎｇ",
    "Ⅻ",
    "x²",
    "٣٤",
    "१२३",
    "Ωmega",
    "ΣΊΣΥΦΟΣ",
    "a\u0301b",
    "e\u0308",
    "\u00a0nbsp",
    "zero\u200bwidth",
    "عربي",
    "עברית",
    "lone\ud83dsurrogate",
]
PUNCT = [
    ".",
    ",",
    "!",
    "?",
    "...",
    "!!",
    "--",
    "—",
    "–",
    "'",
    '"',
    "(",
    ")",
    "[x]",
    "{}",
    "@",
    "#",
    "$",
]
PUNCT += ["&", "*", "/", "\\", ":", ";", "«»", "“”", "„", "…", "·", "•", "_", "__init__", "e-mail"]
PUNCT += ["don't", "it's", "U.S.A.", "o'clock", "<tag>", "a_b", "https://x.org/a?b=1"]
SEPARATORS = [" "] * 12 + [
    ", ",
    ". ",
    "\n",
    "\t",
    "  ",
    "-",
    "/",
    "\u00a0",
    "\u2003",
    "\r\n",
    "—",
    "",
]
WHITESPACE = [
    " ",
    "\t",
    "\n",
    "\r",
    "\x0b",
    "\x0c",
    "\u00a0",
    "\u2003",
    "\u3000",
    "\u200b",
    "\u2028",
]

# Characters whose Python lower() contains an ASCII letter or digit though
# they are not ASCII themselves; checked exhaustively below.
LOWER_TO_ASCII = {"\u0130", "\u212a"}

ALL_WORDS = STEMMING + SHORT + DIGITS + NON_ASCII + PUNCT
CHAR_SOUP = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \t\n.,;:!?'\"-_/"
    "İı\u212aßﬁﬂéÉàüÖñçøåæœŒЖжЯя你好日本😀👍²³٣ⅫＡａ\u0301\u0307\u00a0\u2003\ud800\udfff"
)


# --- generator ----------------------------------------------------------------


def _case(rng: random.Random, word: str) -> str:
    roll = rng.random()
    if roll < 0.75:
        return word
    if roll < 0.85:
        return word.upper()
    if roll < 0.93:
        return word.title()
    return "".join(c.upper() if rng.random() < 0.5 else c for c in word)


def _words(rng: random.Random, n: int, pool: list[str] | None = None) -> list[str]:
    if pool is None:
        weights = rng.choice([(6, 3, 1, 2, 1), (2, 2, 1, 6, 1), (3, 6, 2, 1, 2), (1, 1, 4, 1, 4)])
        pools = rng.choices([STEMMING, SHORT, DIGITS, NON_ASCII, PUNCT], weights=weights, k=n)
        return [_case(rng, rng.choice(p)) for p in pools]
    return [_case(rng, rng.choice(pool)) for _ in range(n)]


def _long_words(rng: random.Random, min_tokens: int) -> list[str]:
    """Words whose text has at least ``min_tokens`` tokens (non-ASCII and punctuation give fewer)."""
    words: list[str] = []
    while len(tokenize(" ".join(words))) < min_tokens:
        words += _words(rng, 200)
    return words


def _join(rng: random.Random, words: list[str]) -> str:
    if not words:
        return ""
    parts = [words[0]]
    for word in words[1:]:
        parts.append(rng.choice(SEPARATORS) if rng.random() < 0.3 else " ")
        parts.append(word)
    text = "".join(parts)
    if rng.random() < 0.15:
        text = rng.choice(WHITESPACE + PUNCT) + text
    if rng.random() < 0.15:
        text += rng.choice(WHITESPACE + ["."] * 5 + PUNCT)
    return text


def _edit(rng: random.Random, words: list[str], n_edits: int) -> list[str]:
    out = list(words)
    for _ in range(n_edits):
        op = rng.randrange(6)
        i = rng.randrange(len(out) + 1)
        if op == 0 and out:  # delete
            del out[min(i, len(out) - 1)]
        elif op == 1:  # insert
            out.insert(i, rng.choice(ALL_WORDS))
        elif op == 2 and out:  # substitute
            out[min(i, len(out) - 1)] = rng.choice(ALL_WORDS)
        elif op == 3 and len(out) > 1:  # swap neighbours
            j = min(i, len(out) - 2)
            out[j], out[j + 1] = out[j + 1], out[j]
        elif op == 4 and out:  # change case / inflect
            j = min(i, len(out) - 1)
            out[j] = _case(rng, out[j]) + rng.choice(["", "s", "ing", "ed", "ly", "ness"])
        else:  # punctuation
            out.insert(i, rng.choice(PUNCT))
    return out


def _char_soup(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(CHAR_SOUP) for _ in range(n))


def _empty_like(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return ""
    if kind == 1:
        return "".join(rng.choice(WHITESPACE) for _ in range(rng.randint(1, 8)))
    if kind == 2:
        return "".join(
            rng.choice(PUNCT[:20]) + rng.choice(["", " "]) for _ in range(rng.randint(1, 8))
        )
    return "".join(rng.choice(NON_ASCII[:18]) + " " for _ in range(rng.randint(1, 5)))


def generate_pairs(seed: int = SEED, n: int = N_PAIRS) -> Iterator[tuple[str, str, str]]:
    """Yield ``(kind, target, prediction)``; deterministic for a given seed."""
    rng = random.Random(seed)
    # A few long texts (1,000+ tokens a side), budgeted: the reference's LCS is O(n*m).
    for _ in range(6):
        words = _long_words(rng, 1000)
        yield (
            "long-near-dup",
            _join(rng, words),
            _join(rng, _edit(rng, words, rng.randint(20, 200))),
        )
    for _ in range(2):
        yield "long-random", _join(rng, _long_words(rng, 1000)), _join(rng, _long_words(rng, 1000))
    words = _long_words(rng, 1100)
    yield "long-identical", _join(rng, words), _join(rng, words)
    yield "long-vs-short", _join(rng, _long_words(rng, 1500)), _join(rng, _words(rng, 12))
    yield "long-vs-empty", _join(rng, _long_words(rng, 1000)), ""
    yield "long-repeated", "the " * 1000, " ".join(["the", "cat"] * 500)
    # Medium texts, around the product's size.
    for _ in range(N_MEDIUM):
        words = _words(rng, rng.randint(100, 250))
        yield (
            "medium-near-dup",
            _join(rng, words),
            _join(rng, _edit(rng, words, rng.randint(1, 40))),
        )
    produced = 12 + N_MEDIUM
    kinds = [
        "random",
        "near-dup",
        "near-dup",
        "near-dup",
        "identical",
        "empty",
        "repeated",
        "soup",
        "stem-variants",
        "single",
    ]
    while produced < n:
        kind = rng.choice(kinds)
        if kind == "random":
            target, prediction = (
                _join(rng, _words(rng, rng.randint(0, 40))),
                _join(rng, _words(rng, rng.randint(0, 40))),
            )
        elif kind == "near-dup":
            words = _words(rng, rng.randint(1, 50))
            target, prediction = (
                _join(rng, words),
                _join(rng, _edit(rng, words, rng.randint(0, 10))),
            )
        elif kind == "identical":
            target = _join(rng, _words(rng, rng.randint(0, 40)))
            prediction = target
        elif kind == "empty":
            target = _empty_like(rng)
            prediction = (
                _join(rng, _words(rng, rng.randint(0, 20)))
                if rng.random() < 0.6
                else _empty_like(rng)
            )
        elif kind == "repeated":
            pool = rng.sample(SHORT + STEMMING[:20], k=rng.randint(1, 4))
            target, prediction = (
                _join(rng, _words(rng, rng.randint(1, 60), pool)),
                _join(rng, _words(rng, rng.randint(1, 60), pool)),
            )
        elif kind == "soup":
            target, prediction = (
                _char_soup(rng, rng.randint(0, 80)),
                _char_soup(rng, rng.randint(0, 80)),
            )
            if rng.random() < 0.5:
                prediction = target[: rng.randint(0, len(target))] + _char_soup(
                    rng, rng.randint(0, 10)
                )
        elif kind == "stem-variants":
            stems = rng.sample(STEMMING, k=rng.randint(1, 12))
            target = _join(rng, [_case(rng, w) for w in stems])
            prediction = _join(
                rng, [_case(rng, w + rng.choice(["", "s", "ing", "ed", "ly", "er"])) for w in stems]
            )
        else:
            target, prediction = rng.choice(ALL_WORDS), rng.choice(ALL_WORDS)
        if rng.random() < 0.5:
            target, prediction = prediction, target
        produced += 1
        yield kind, target, prediction


PAIRS = list(generate_pairs())


# --- tests --------------------------------------------------------------------


def test_generator_is_large_and_varied() -> None:
    assert len(PAIRS) >= 10_000
    assert list(generate_pairs()) == PAIRS  # deterministic
    texts = [t for _, target, prediction in PAIRS for t in (target, prediction)]
    joined = "".join(texts[:: max(1, len(texts) // 4000)]) + "".join(
        t for t in texts if len(t) < 200
    )
    for needle in ("İ", "\u212a", "ß", "ﬁ", "ж", "你", "😀", "é", "\t", "\u00a0", "2024"):
        assert needle in joined, needle
    assert any(t == "" for t in texts)
    assert any(p == t and t for _, t, p in PAIRS)
    assert any(t and not tokenize(t) for t in texts)
    assert sum(len(tokenize(t)) >= 1000 for t in texts) >= 10


def test_every_lowering_to_ascii_is_covered() -> None:
    """The only non-ASCII code points whose lower() yields [a-z0-9] are in LOWER_TO_ASCII."""
    found = {
        chr(c)
        for c in range(0x80, 0x110000)
        if not 0xD800 <= c <= 0xDFFF and re.search("[a-z0-9]", chr(c).lower())
    }
    assert found == LOWER_TO_ASCII
    assert all(ch in "".join(NON_ASCII) and ch in CHAR_SOUP for ch in LOWER_TO_ASCII)


def test_parity_with_rouge_score() -> None:
    mismatches = []
    for i, (kind, target, prediction) in enumerate(PAIRS):
        ours = rouge_l(target, prediction)
        expected = reference(target, prediction)
        if ours != expected or not isinstance(ours, float):
            mismatches.append((i, kind, target[:80], prediction[:80], ours, expected))
    assert not mismatches, f"{len(mismatches)} of {len(PAIRS)} differ; first: " + "\n".join(
        repr(m) for m in mismatches[:5]
    )


def test_tokenize_matches_reference_tokenizer() -> None:
    tokenizer = _REFERENCE._tokenizer
    for _, target, prediction in PAIRS[::7]:
        for text in (target, prediction):
            assert tokenize(text) == tokenizer.tokenize(text), text[:80]


HAND_PICKED = [
    ("identical", "the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("disjoint", "alpha beta", "gamma delta", 0.0),
    ("both empty", "", "", 0.0),
    ("empty target", "", "some prediction", 0.0),
    ("empty prediction", "some target", "", 0.0),
    ("whitespace only", " \t\n ", "words here", 0.0),
    ("punctuation only", "!!! ... ???", "!!! ... ???", 0.0),
    ("non-ASCII only", "привет мир 你好", "привет мир 你好", 0.0),
    # LCS "the cat on mat" = 4; P = 4/5, R = 4/6, F = 2PR/(P+R) = 8/11.
    (
        "by hand",
        "the cat sat on the mat",
        "the cat on a mat",
        2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6),
    ),
    # LCS of "a b a b" and "b a b a" is 3; P = R = 3/4.
    ("repeated", "a b a b", "b a b a", 0.75),
    ("stemming", "Running runs generously", "run run generous", 1.0),
    ("short tokens unstemmed", "ran runs", "ran run", 1.0),
    ("case", "HELLO World", "hello world", 1.0),
    ("kelvin sign", "\u212aelvin scale", "kelvin scale", 1.0),
    # "İstanbul".lower() == "i\u0307stanbul": tokens "i", "stanbul".
    ("dotted capital I", "İstanbul", "i stanbul", 1.0),
    ("dotted capital I vs istanbul", "İstanbul", "istanbul", 0.0),
    # lower() keeps "ß" and "ﬁ", which are not [a-z0-9] and so split tokens.
    ("sharp s", "straße", "stra e", 1.0),
    ("ligature", "ﬁnance", "nance", 1.0),
    ("lone surrogate", "ab\ud800cd", "ab cd", 1.0),
    ("digits", "3.14 and 2024", "3 14 and 2024", 1.0),
    # One of two tokens matches each way: P = 1/2, R = 1/1, F = 2/3.
    ("half", "cats", "cat dog", 2 * (1 / 2) * (1 / 1) / (1 / 2 + 1 / 1)),
]


@pytest.mark.parametrize(
    ("target", "prediction", "expected"),
    [case[1:] for case in HAND_PICKED],
    ids=[case[0] for case in HAND_PICKED],
)
def test_hand_picked(target: str, prediction: str, expected: float) -> None:
    assert rouge_l(target, prediction) == expected
    assert reference(target, prediction) == expected


def test_hand_computed_value() -> None:
    assert abs(rouge_l("the cat sat on the mat", "the cat on a mat") - 8 / 11) < 1e-15


def test_the_token_ids_stay_bounded_and_exact_across_clears(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker forgets its token ids once it holds MAX_VOCABULARY of them; the scores
    before, across and after each clear are still the reference's."""
    from streams import rouge

    monkeypatch.setattr(rouge, "MAX_VOCABULARY", 50)
    rouge.clear_cache()
    rng = random.Random(3)
    words = [f"w{i}ing" for i in range(400)] + ["running", "runs", "ran", "the"]
    sizes = []
    for _ in range(60):
        target = " ".join(rng.choices(words, k=30))
        prediction = " ".join(rng.choices(words, k=25) + target.split()[:10])
        assert rouge_l(target, prediction) == reference(target, prediction)
        sizes.append(len(rouge._RAW_IDS))
    assert max(sizes) <= 50 + 2 * 40  # at most one pair's new tokens past the bound
    assert any(later < earlier for earlier, later in itertools.pairwise(sizes))
    rouge.clear_cache()
