"""``lorastream adapters forgetting ADAPTER``: the matrix R, ACC and BWT, read from the
announcements on the real broker, as text and as JSON."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from typer.testing import CliRunner

from lorastream.cli import app
from lorastream.dev.topics import make_topics
from tests.serving.helpers import announce
from tests.trainer.test_forgetting import LINEAGE


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_adapters_forgetting_prints_r_acc_and_bwt_and_json(
    kafka_bootstrap: str, prefix: str
) -> None:
    async def setup() -> None:
        topics = await make_topics(kafka_bootstrap, prefix)
        await announce(kafka_bootstrap, topics, LINEAGE)

    asyncio.run(setup())
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "LORASTREAM_TOPIC_PREFIX": prefix,
        "LORASTREAM_ADAPTER_DIR": "/nowhere",
    }

    def run(*args: str) -> str:
        result = CliRunner().invoke(app, ["adapters", "forgetting", *args], env=env)
        assert result.exit_code == 0, result.output
        return result.output

    text = run("tutor")
    rows = [line.split() for line in text.splitlines()]
    assert ["A", "(v2)", "2.0000", "-", "-"] in rows, text
    assert ["B", "(v4)", "2.4000", "1.0000", "-"] in rows, text
    assert ["C", "(v5)", "2.6000", "1.5000", "0.5000"] in rows, text
    assert ["base", "6.0000", "6.0000", "6.0000"] in rows, text
    assert "ACC 1.5333 (mean of the last row)" in text
    assert "BWT -0.5500 (-36.67% of the diagonal's mean); negative: forgetting" in text

    document = orjson.loads(run("tutor", "--json"))
    assert document["segments"] == ["A", "B", "C"] and document["versions"] == [2, 4, 5]
    assert document["R"] == [[2.0, None, None], [2.4, 1.0, None], [2.6, 1.5, 0.5]]
    assert document["ACC"] == pytest.approx(4.6 / 3)
    assert document["BWT"] == pytest.approx(-0.55)

    unknown = CliRunner().invoke(app, ["adapters", "forgetting", "nobody"], env=env)
    assert unknown.exit_code != 0


def test_the_loss_picture_gains_one_held_out_curve_per_segment_and_the_general_set() -> None:
    from lorastream.demo.picture import Panel, general_curve, learning_figure, segment_curves

    updates = LINEAGE
    curves = segment_curves(updates)
    assert curves == {
        "A": [3.0, 2.0, 2.2, 2.4, 2.6],
        "B": [None, None, 4.0, 1.0, 1.5],
        "C": [None, None, None, None, 0.5],
    }
    assert general_curve(updates) == (None, None)
    panel = Panel(
        title="tutor",
        versions=[u.version for u in updates],
        train=[u.train_loss for u in updates],
        held_out=[u.eval.loss if u.eval else None for u in updates],
        segments=curves,
        general=[4.0, 4.1, 4.2, 4.3, 4.4],
        general_base=4.0,
    )
    figure = learning_figure([panel], "learning", "version")
    assert len(figure.axes) == 2
    lines = {line.get_label(): list(line.get_ydata()) for line in figure.axes[1].get_lines()}
    assert lines["A"] == [3.0, 2.0, 2.2, 2.4, 2.6] and lines["C"] == [0.5]
    assert lines["general set"] == [4.0, 4.1, 4.2, 4.3, 4.4]
    assert "general set, base model" in lines
    # Without segments or a general set, the picture is one row, as before.
    plain = Panel(title="t", versions=[1], train=[1.0], held_out=[None])
    assert len(learning_figure([plain], "learning", "version").axes) == 1
