"""The learning picture: train and held-out loss per version, beside an offline reference.

One panel per adapter. Drawn by the demo for its own run and by
``bench/bench_learning.py``; matplotlib is imported only when drawing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

__all__ = ["Panel", "draw_learning", "learning_figure"]

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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

    figure = Figure(figsize=(5 * len(panels), 4.2), dpi=100)
    FigureCanvasAgg(figure)
    for i, panel in enumerate(panels, 1):
        _draw_panel(figure.add_subplot(1, len(panels), i), panel, xlabel, chance)
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
