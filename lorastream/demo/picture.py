"""The learning picture: train and held-out loss per version, beside an offline reference.

One panel per adapter. Drawn by the demo for its own run and by
``bench/bench_learning.py``; matplotlib is imported only when drawing.

Where the versions were evaluated per segment of the stream (or on the general set,
LORASTREAM_GENERAL_EVAL), a second row shows, per adapter, one held-out curve per
segment and the general-set curve beside the base model's: a curve that rises again
after its segment has passed is the adapter forgetting it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

__all__ = ["Panel", "draw_learning", "general_curve", "learning_figure", "segment_curves"]

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from schemas import AdapterUpdate

# Room below 0 on the loss axis, as a share of the highest value drawn: an offline
# fine-tune that learned the events by heart has a held-out loss of 0.00, and a line at
# the bottom of the axes hid behind the x axis (#22).
BELOW_ZERO = 0.06


@dataclass(frozen=True)
class Panel:
    """One adapter's curves: per version its train loss (the window's, before its step)
    and its held-out loss; the base model's held-out loss is drawn at version 0."""

    title: str
    versions: list[int]
    train: list[float]
    held_out: list[float | None]
    base: float | None = None
    offline: float | None = None  # the offline fine-tune's held-out loss, a dashed line
    offline_label: str = "offline fine-tune, held-out"
    # Per segment, its held-out loss after each version (None: not in that version's set).
    segments: dict[str, list[float | None]] = field(default_factory=dict)
    general: list[float | None] | None = None  # the general-set loss after each version
    general_base: float | None = None  # the base model's on the general set


def segment_curves(updates: Sequence[AdapterUpdate]) -> dict[str, list[float | None]]:
    """Per segment (in order of first appearance), its held-out loss after each of
    ``updates``: :attr:`Panel.segments` from a lineage's announcements."""
    curves: dict[str, list[float | None]] = {}
    for i, update in enumerate(updates):
        for segment in (update.eval.segments or []) if update.eval else []:
            curve = curves.setdefault(segment.segment, [None] * len(updates))
            curve[i] = segment.loss
    return curves


def general_curve(
    updates: Sequence[AdapterUpdate],
) -> tuple[list[float | None] | None, float | None]:
    """:attr:`Panel.general` and :attr:`Panel.general_base` from a lineage's announcements
    (None, None when no version was measured on a general set)."""
    measured = [u.general_eval for u in updates if u.general_eval is not None]
    if not measured:
        return None, None
    curve = [u.general_eval.loss if u.general_eval else None for u in updates]
    return curve, measured[0].base_loss


def draw_learning(
    png: Path, panels: list[Panel], title: str, xlabel: str, chance: float | None = None
) -> None:
    """Write ``png``: the panels side by side, 500 x 420 pixels each."""
    figure = learning_figure(panels, title, xlabel, chance)
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)


def learning_figure(
    panels: list[Panel], title: str, xlabel: str, chance: float | None = None
) -> Figure:
    """The figure :func:`draw_learning` writes, laid out and ready to save."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = 2 if any(panel.segments or panel.general for panel in panels) else 1
    figure = Figure(figsize=(5 * len(panels), 4.2 * rows), dpi=100)
    FigureCanvasAgg(figure)
    for i, panel in enumerate(panels, 1):
        _draw_panel(figure.add_subplot(rows, len(panels), i), panel, xlabel, chance)
        if rows == 2:
            axes = figure.add_subplot(rows, len(panels), len(panels) + i)
            _draw_segments(axes, panel, xlabel)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _draw_panel(axes: Axes, panel: Panel, xlabel: str, chance: float | None) -> None:
    axes.plot(panel.versions, panel.train, marker=".", label="train loss (window, before its step)")
    points = [(v, loss) for v, loss in zip(panel.versions, panel.held_out, strict=True)]
    if panel.base is not None:
        points.insert(0, (0, panel.base))
    measured = [(v, loss) for v, loss in points if loss is not None]
    if measured:
        axes.plot(
            [v for v, _ in measured],
            [loss for _, loss in measured],
            marker=".",
            label="held-out loss after the version",
        )
    highest = max([*panel.train, *(loss for _, loss in measured), chance or 0.0, 0.0])
    if panel.offline is not None:
        # Thick, dashed, above the other lines and named with its value in the legend:
        # it is most often near 0, where it must still be seen.
        axes.axhline(
            panel.offline,
            color="C2",
            linestyle="--",
            linewidth=2,
            zorder=3,
            label=f"{panel.offline_label}: {panel.offline:.2f}",
        )
        highest = max(highest, panel.offline)
    if chance is not None:
        axes.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    axes.set_title(panel.title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("nats per response token")
    axes.set_ylim(bottom=-BELOW_ZERO * (highest or 1.0))
    axes.axhline(0, color="black", linewidth=0.5, zorder=1)  # where the loss axis starts
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)


def _draw_segments(axes: Axes, panel: Panel, xlabel: str) -> None:
    """One held-out curve per segment, and the general set's beside the base model's."""
    highest = 0.0
    for segment, curve in panel.segments.items():
        points = [
            (v, loss) for v, loss in zip(panel.versions, curve, strict=True) if loss is not None
        ]
        if points:
            axes.plot([v for v, _ in points], [y for _, y in points], marker=".", label=segment)
            highest = max(highest, *(y for _, y in points))
    if panel.general is not None:
        points = [
            (v, y) for v, y in zip(panel.versions, panel.general, strict=True) if y is not None
        ]
        if points:
            axes.plot(
                [v for v, _ in points],
                [y for _, y in points],
                color="black",
                linestyle="--",
                label="general set",
            )
            highest = max(highest, *(y for _, y in points))
    if panel.general_base is not None:
        axes.axhline(
            panel.general_base, color="grey", linestyle=":", label="general set, base model"
        )
        highest = max(highest, panel.general_base)
    axes.set_title(f"{panel.title}: held-out loss per segment")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("nats per response token")
    axes.set_ylim(bottom=-BELOW_ZERO * (highest or 1.0))
    axes.grid(alpha=0.3)
    if axes.get_lines():
        axes.legend(fontsize=8)
