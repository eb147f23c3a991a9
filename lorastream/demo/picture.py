"""The learning picture: train and held-out loss per version, beside an offline reference.

One panel per adapter. Drawn by the demo for its own run and by
``bench/bench_learning.py``; matplotlib is imported only when drawing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Panel", "draw_learning"]


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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(panels), 4.2), dpi=100)
    FigureCanvasAgg(figure)
    for i, panel in enumerate(panels, 1):
        axes = figure.add_subplot(1, len(panels), i)
        axes.plot(
            panel.versions, panel.train, marker=".", label="train loss (window, before its step)"
        )
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
        if panel.offline is not None:
            axes.axhline(panel.offline, color="C2", linestyle="--", label=panel.offline_label)
        if chance is not None:
            axes.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
        axes.set_title(panel.title)
        axes.set_xlabel(xlabel)
        axes.set_ylabel("nats per response token")
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
