"""Pairs per second of ROUGE-L: rouge-score (the reference) against ``streams.rouge``.

Seeded English-like pairs (Zipf-distributed words, many with inflections
that stem, punctuation, some capitals), the prediction a near-duplicate of
the target, at about 50 and about 200 tokens a side. ``ours (warm)`` is the
steady state of a worker, whose stem cache already holds the vocabulary;
``ours (cold)`` clears that cache before the timed pass.

    .venv/bin/python bench/bench_rouge.py [--pairs 400] [--seed 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import random
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rouge_score import rouge_scorer

from bench.report import Row, add_json_option, write_json
from streams import rouge
from streams.rouge import rouge_l

SUFFIXES = ["", "", "", "s", "ing", "ed", "ly", "ness", "er", "ation", "ful"]
PUNCTUATION = ["", "", "", "", "", "", ",", ".", "!", "?", ";"]


def make_pairs(rng: random.Random, n_pairs: int, n_tokens: int) -> list[tuple[str, str]]:
    vocabulary = [
        "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(5000)
    ]
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]

    def words(n: int) -> list[str]:
        out = []
        for word in rng.choices(vocabulary, weights=weights, k=n):
            word += rng.choice(SUFFIXES)
            if rng.random() < 0.05:
                word = word.capitalize()
            out.append(word + rng.choice(PUNCTUATION))
        return out

    pairs = []
    for _ in range(n_pairs):
        target = words(n_tokens)
        prediction = list(target)
        for _ in range(rng.randint(n_tokens // 10, n_tokens // 3)):
            i = rng.randrange(len(prediction))
            op = rng.randrange(3)
            if op == 0:
                del prediction[i]
            elif op == 1:
                prediction.insert(i, words(1)[0])
            else:
                prediction[i] = words(1)[0]
        pairs.append((" ".join(target), " ".join(prediction)))
    return pairs


def rate(
    fn: Callable[[str, str], float], pairs: list[tuple[str, str]], min_seconds: float
) -> float:
    """Pairs per second, over whole passes of ``pairs`` lasting at least ``min_seconds``."""
    done = 0
    start = time.perf_counter()
    while True:
        for target, prediction in pairs:
            fn(target, prediction)
        done += len(pairs)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400, help="distinct pairs per size")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum time per measurement")
    add_json_option(parser)
    args = parser.parse_args()
    rows: list[Row] = []
    checked = differ = 0

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def reference(target: str, prediction: str) -> float:
        return float(scorer.score(target, prediction)["rougeL"].fmeasure)

    rng = random.Random(args.seed)
    print(
        f"{'tokens/side':>11}  {'reference':>12}  {'ours (cold)':>12}  {'ours (warm)':>12}  {'speed-up':>8}"
    )
    for n_tokens in (50, 200):
        pairs = make_pairs(rng, args.pairs, n_tokens)
        mismatches = sum(rouge_l(t, p) != reference(t, p) for t, p in pairs)
        assert mismatches == 0, f"{mismatches} pairs differ from the reference"
        checked, differ = checked + len(pairs), differ + mismatches
        ref_rate = rate(reference, pairs, args.seconds)
        rouge.clear_cache()
        start = time.perf_counter()
        for target, prediction in pairs:
            rouge_l(target, prediction)
        cold_rate = len(pairs) / (time.perf_counter() - start)
        warm_rate = rate(rouge_l, pairs, args.seconds)
        print(
            f"{n_tokens:>11}  {ref_rate:>10,.0f}/s  {cold_rate:>10,.0f}/s  {warm_rate:>10,.0f}/s"
            f"  {warm_rate / ref_rate:>7,.0f}x"
        )
        reference_text = f"{ref_rate:,.0f} pairs/s (rouge-score)"
        rows += [
            Row(
                f"ROUGE-L, ~{n_tokens} tokens a side, warm",
                f"{warm_rate:,.0f} pairs/s",
                reference=reference_text,
            ),
            Row(
                f"ROUGE-L, ~{n_tokens} tokens a side, cold",
                f"{cold_rate:,.0f} pairs/s",
                reference=reference_text,
            ),
            Row(
                f"speed-up over rouge-score, ~{n_tokens} tokens a side, warm",
                f"{warm_rate / ref_rate:,.0f}x",
                reference="1x (rouge-score)",
            ),
        ]

    if args.json is not None:
        rows.append(
            Row(
                "pairs whose ROUGE-L differs from rouge-score's",
                f"{differ} of {checked:,}",
                goal="the same floats as rouge-score (#2)",
                reference=f"{checked:,} pairs scored by rouge-score",
                met=differ == 0,
            )
        )
        write_json(
            args.json,
            "ROUGE-L: streams.rouge against rouge-score",
            rows,
            [
                f"{args.pairs} seeded English-like pairs per size (seed {args.seed}), the "
                "prediction a near-duplicate of the target; each rate over whole passes "
                f"lasting at least {args.seconds:g}s.",
                "warm: the worker's steady state, its stem cache holding the vocabulary; "
                "cold: the cache cleared before one timed pass.",
                "No speed goal for ROUGE-L alone: issue #14's 50x goal is for the scoring "
                "stage end to end (bench_scoring).",
            ],
        )


if __name__ == "__main__":
    main()
