"""The demo's learning picture: every line it draws can be seen (#22)."""

from __future__ import annotations

from pathlib import Path

from lorastream.demo.picture import Panel, draw_learning, learning_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _panel(offline: float) -> Panel:
    return Panel(
        title="tutor",
        versions=[1, 2, 3],
        train=[5.0, 2.0, 0.5],
        held_out=[4.0, 1.5, 0.4],
        base=5.9,
        offline=offline,
        offline_label="offline, 3 epochs, same events",
    )


def test_an_offline_line_at_zero_is_drawn_above_the_x_axis_and_named_with_its_value() -> None:
    """A held-out loss of 0.00 (the offline fine-tune learned the events by heart) sat on
    the x axis, where the axis hid it: it must lie well inside the axes, in pixels."""
    figure = learning_figure([_panel(0.0)], "learning", "version", chance=5.95)
    figure.canvas.draw()
    axes = figure.axes[0]
    offline = next(line for line in axes.get_lines() if line.get_label().startswith("offline"))
    _, y = axes.transData.transform((1, offline.get_ydata()[0]))
    assert y - axes.bbox.y0 >= 5, f"the offline line is {y - axes.bbox.y0:.1f} px above the axis"
    assert offline.get_linestyle() == "--" and offline.get_linewidth() >= 2
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert "offline, 3 epochs, same events: 0.00" in legend, legend


def test_the_picture_is_a_png(tmp_path: Path) -> None:
    png = tmp_path / "sub" / "learning.png"
    draw_learning(png, [_panel(0.3), _panel(0.0)], "learning", "version")
    assert png.read_bytes().startswith(PNG_SIGNATURE)
