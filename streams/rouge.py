"""Exact and fast ROUGE-L F-measure.

Contract: ``rouge_l(target, prediction)`` returns exactly (the same float,
equal under ``==``) what the reference returns::

    rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        .score(target, prediction)["rougeL"].fmeasure

for every pair of ``str``. In the scoring stage the baseline is the target
and the response is the prediction. (Where either side has no token the
reference returns the ``int`` 0, this returns ``0.0``; the two are ``==``.)

Why this exists: the reference computes the longest common subsequence with
a pure-Python O(n*m) table and runs NLTK's Porter stemmer on every token of
every call, which makes it the bottleneck of the scoring worker (about 900
pairs/s at 50 tokens a side, about 115 at 200). Here the tokenization is
replicated exactly (on bytes, see below), every distinct token is stemmed
once and mapped to a small int (stemming is a pure function), and the LCS
length comes from rapidfuzz's bit-parallel ``LCSseq`` in C over those ints.
``bench/bench_rouge.py`` on a 2-core machine, warm: about 95,000 pairs/s at
50 tokens a side (about 100x) and about 23,000 pairs/s at 200 (about
180x). ``rouge-score`` stays a dependency: it is the reference the parity
test (tests/streams/test_rouge_parity.py) checks against.

Replicated tokenization (``rouge_score.tokenize.tokenize`` with
``nltk.stem.porter.PorterStemmer()`` in its default ``NLTK_EXTENSIONS``
mode):

1. ``text.lower()`` -- Python's full Unicode lowering, which can turn
   non-ASCII characters into ASCII letters ('K' KELVIN SIGN -> 'k',
   'İ' -> 'i' + U+0307; these two are the only such code points, which the
   parity test checks exhaustively), so it must not be replaced by an
   ASCII-only lowering, nor by ``casefold()`` ('ß' -> 'ss', 'ﬁ' -> 'fi');
2. every run of characters outside ``[a-z0-9]`` separates tokens (ASCII
   only: accented letters, Cyrillic, CJK, 'ß', 'ﬁ', Unicode digits all
   separate);
3. tokens longer than 3 characters are Porter-stemmed;
4. tokens that are not ``^[a-z0-9]+$`` after stemming are dropped.
"""

from __future__ import annotations

import re
from functools import lru_cache

from nltk.stem.porter import PorterStemmer
from rapidfuzz.distance import LCSseq

__all__ = ["clear_cache", "rouge_l", "tokenize"]

# The reference lowers, replaces ``[^a-z0-9]+`` by a space and splits on
# ``\s+``; the pieces are exactly the maximal runs of ``[a-z0-9]`` (plus empty
# strings at the ends, which its final filter drops). Those runs are found
# here on bytes: in UTF-8 every byte of a non-ASCII character is >= 0x80, so
# no such byte is an ASCII letter or digit, and mapping every byte outside
# ``[a-z0-9]`` to a space and splitting on whitespace yields the same runs,
# several times faster than the regex. ``surrogatepass`` lets lone
# surrogates (legal in a ``str``) through as three bytes >= 0x80 each.
_KEEP = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789")
_SPACE_TABLE = bytes(byte if byte in _KEEP else 0x20 for byte in range(256))
_VALID_TOKEN_RE = re.compile(r"^[a-z0-9]+$")
_STEMMER = PorterStemmer()  # as rouge_score.tokenizers.DefaultTokenizer builds it


@lru_cache(maxsize=2**16)
def _normalize(token: bytes) -> str:
    """The reference's stem-and-check of one ``[a-z0-9]+`` token; '' if dropped."""
    word = token.decode("ascii")
    if len(word) > 3:
        word = _STEMMER.stem(word)
    return word if _VALID_TOKEN_RE.match(word) else ""


def tokenize(text: str) -> list[str]:
    """Tokens of ``text`` exactly as rouge-score's default tokenizer with stemming."""
    runs = text.lower().encode("utf-8", "surrogatepass").translate(_SPACE_TABLE).split()
    tokens = list(map(_normalize, runs))
    if "" in tokens:  # never seen with the Porter stemmer; kept for exactness
        tokens = [token for token in tokens if token]
    return tokens


# Token ids: each distinct raw token (bytes) maps to the id of its stem, stems to ids in
# the order first seen ("" to -1: dropped). A stem's id is the same in both texts of a
# pair, so the LCS over ids is the LCS over stems. Both maps are cleared together, between
# two pairs, once they hold MAX_VOCABULARY raw tokens: memory stays bounded whatever
# arrives, and the ids of one pair always come from one generation of the maps.
MAX_VOCABULARY = 2**18
_RAW_IDS: dict[bytes, int] = {}
_STEM_IDS: dict[str, int] = {"": -1}


def _new_id(token: bytes) -> int:
    stem = _normalize(token)
    ident = _STEM_IDS.setdefault(stem, len(_STEM_IDS))
    _RAW_IDS[token] = ident
    return ident


def _ids(text: str) -> list[int]:
    """The ids of ``text``'s tokens, in order: ``tokenize(text)`` as ints."""
    runs = text.lower().encode("utf-8", "surrogatepass").translate(_SPACE_TABLE).split()
    try:
        ids = list(map(_RAW_IDS.__getitem__, runs))  # the warm path: every token seen before
    except KeyError:
        ids = [_RAW_IDS[run] if run in _RAW_IDS else _new_id(run) for run in runs]
    if -1 in ids:  # never seen with the Porter stemmer; kept for exactness
        ids = [ident for ident in ids if ident != -1]
    return ids


def clear_cache() -> None:
    """Forget every token seen (the stems' cache too): a cold start, for benchmarks."""
    _RAW_IDS.clear()
    _STEM_IDS.clear()
    _STEM_IDS[""] = -1
    _normalize.cache_clear()


def rouge_l(target: str, prediction: str) -> float:
    """ROUGE-L F-measure of ``prediction`` against ``target``, bit-identical to rouge-score."""
    if len(_RAW_IDS) > MAX_VOCABULARY:
        clear_cache()
    target_ids = _ids(target)
    prediction_ids = _ids(prediction)
    if not target_ids or not prediction_ids:
        return 0.0
    lcs_length = LCSseq.similarity(target_ids, prediction_ids)
    # The reference's formula and order of operations (rouge_scorer._score_lcs, scoring.fmeasure).
    precision = lcs_length / len(prediction_ids)
    recall = lcs_length / len(target_ids)
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0
