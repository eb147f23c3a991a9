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
replicated exactly (on bytes, see below), stems are cached (stemming is a
pure function), and the LCS length comes from rapidfuzz's bit-parallel
``LCSseq`` in C. ``bench/bench_rouge.py`` on a 2-core machine, warm stem
cache: about 55,000 pairs/s at 50 tokens a side (about 60x) and about
12,000 pairs/s at 200 (about 100x). ``rouge-score`` stays a dependency: it
is the reference the parity test (tests/streams/test_rouge_parity.py)
checks against.

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

__all__ = ["rouge_l", "tokenize"]

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


def rouge_l(target: str, prediction: str) -> float:
    """ROUGE-L F-measure of ``prediction`` against ``target``, bit-identical to rouge-score."""
    target_tokens = tokenize(target)
    prediction_tokens = tokenize(prediction)
    if not target_tokens or not prediction_tokens:
        return 0.0
    # Per-call vocabulary: distinct tokens get distinct small ints, so the LCS
    # is exact (rapidfuzz would otherwise compare the tokens' hashes).
    vocabulary: dict[str, int] = {}
    target_ids = [vocabulary.setdefault(token, len(vocabulary)) for token in target_tokens]
    prediction_ids = [vocabulary.setdefault(token, len(vocabulary)) for token in prediction_tokens]
    lcs_length = LCSseq.similarity(target_ids, prediction_ids)
    # The reference's formula and order of operations (rouge_scorer._score_lcs, scoring.fmeasure).
    precision = lcs_length / len(prediction_tokens)
    recall = lcs_length / len(target_tokens)
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0
