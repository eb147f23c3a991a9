"""The forgetting matrix of one adapter, read from its announcements alone (no model).

GEM's accuracy matrix (Lopez-Paz & Ranzato, arXiv 1706.08840) with the held-out loss
for performance: ``R[i][j]`` is the loss on segment ``j``'s held-out events of the last
evaluated version that trained in segment ``i`` (:attr:`schemas.EvalSpec.segment`), the
segments in the order the adapter last trained in them, so the last row is its newest
version. ``ACC`` is the mean of the last row (lower is better); ``BWT`` is the mean over
the earlier segments ``j`` of ``R[j][j] - R[T][j]``: GEM's sign, with performance the
negated loss, so a negative BWT is forgetting (the loss on what was learnt rose since).

Torch-free, so that ``adapters forgetting`` and the benchmarks use the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from schemas import AdapterUpdate

__all__ = ["Forgetting", "forgetting", "summarise"]

_CORNER = "after \\ on"


@dataclass(frozen=True)
class Forgetting:
    """An adapter's forgetting matrix and its two summaries (None where undefined)."""

    adapter: str
    segments: list[str]  # the rows', and the columns', in order
    versions: list[int]  # the version each row was read from
    matrix: list[list[float | None]]  # None: the version had no event of that segment
    base: list[float | None]  # the base model's loss per segment, from the newest version
    acc: float | None
    bwt: float | None
    bwt_percent: float | None  # BWT as a percentage of the diagonal's mean

    def lines(self) -> list[str]:
        """The matrix as aligned text: a row per segment, the base model's, ACC and BWT."""
        names = [f"{s} (v{v})" for s, v in zip(self.segments, self.versions, strict=True)]
        first = max(len(name) for name in [*names, _CORNER])
        widths = [max(len(s), 8) for s in self.segments]
        head = _CORNER.ljust(first) + "".join(
            "  " + s.rjust(w) for s, w in zip(self.segments, widths, strict=True)
        )
        lines = [
            f"{self.adapter}: held-out loss on each segment (columns) after training through "
            "each segment (rows); lower is better",
            head,
        ]
        for name, row in [*zip(names, self.matrix, strict=True), ("base", self.base)]:
            cells = "".join(f"  {_number(v).rjust(w)}" for v, w in zip(row, widths, strict=True))
            lines.append(name.ljust(first) + cells)
        lines.append(f"ACC {_number(self.acc)} (mean of the last row)")
        if self.bwt is None:
            lines.append("BWT - (no earlier segment to compare)")
        else:
            share = "" if self.bwt_percent is None else f" ({self.bwt_percent:+.2f}%"
            share += " of the diagonal's mean)" if share else ""
            lines.append(f"BWT {self.bwt:+.4f}{share}; negative: forgetting")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "segments": self.segments,
            "versions": self.versions,
            "R": self.matrix,
            "base": self.base,
            "ACC": self.acc,
            "BWT": self.bwt,
            "BWT_percent": self.bwt_percent,
        }


def forgetting(adapter: str, updates: Sequence[AdapterUpdate]) -> Forgetting:
    """The matrix of ``adapter`` from its ``updates`` (a lineage, in version order).

    Versions without a per-segment evaluation (none held out yet, evaluation off, or
    announced before segments existed) are left out.
    """
    last: dict[str, AdapterUpdate] = {}
    for update in sorted(updates, key=lambda u: u.version):
        if update.eval is not None and update.eval.segment and update.eval.segments:
            last.pop(update.eval.segment, None)  # re-inserted: ordered by its last version
            last[update.eval.segment] = update
    segments = list(last)
    losses = [_losses(update) for update in last.values()]
    matrix = [[row.get(s, (None, None))[0] for s in segments] for row in losses]
    base = [losses[-1].get(s, (None, None))[1] for s in segments] if losses else []
    acc, bwt, percent = summarise(matrix)
    return Forgetting(
        adapter=adapter,
        segments=segments,
        versions=[update.version for update in last.values()],
        matrix=matrix,
        base=base,
        acc=acc,
        bwt=bwt,
        bwt_percent=percent,
    )


def summarise(
    matrix: Sequence[Sequence[float | None]],
) -> tuple[float | None, float | None, float | None]:
    """ACC, BWT and BWT as a percentage of the diagonal's mean, of a square loss matrix
    R[i][j] (None: not measured); what a benchmark that measures R itself reuses."""
    if not matrix:
        return None, None, None
    last = matrix[-1]
    pairs = [
        (diagonal, final)
        for j in range(len(matrix) - 1)
        if (diagonal := matrix[j][j]) is not None and (final := last[j]) is not None
    ]
    if not pairs:
        return _mean(list(last)), None, None
    bwt = fmean(diagonal - final for diagonal, final in pairs)
    scale = fmean(diagonal for diagonal, _ in pairs)
    return _mean(list(last)), bwt, 100 * bwt / scale if scale else None


def _losses(update: AdapterUpdate) -> dict[str, tuple[float, float]]:
    assert update.eval is not None and update.eval.segments is not None
    return {s.segment: (s.loss, s.base_loss) for s in update.eval.segments}


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _mean(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return fmean(known) if known else None
