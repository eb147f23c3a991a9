"""The general-drift gate: a version that got worse on the general set is never loaded.

``serve --max-general-regression X`` refuses a version whose general-set loss is above
the base model's by more than X, however good its held-out eval is. The rule as a
table; then serve against the contract servers on the real broker, with real adapter
files and ``general_eval`` set on their announcements.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from lorastream.dev.topics import make_topics
from lorastream.serving import Serve
from lorastream.serving.verify import check_general
from schemas import AdapterUpdate, EvalSpec, GeneralEvalSpec
from tests.serving.contract import ContractServer
from tests.serving.helpers import announce, config_for, eventually, running

SHA = "a" * 64


def _with(update: AdapterUpdate, eval_loss: float, general: float | None) -> AdapterUpdate:
    return update.model_copy(
        update={
            "eval": EvalSpec(loss=eval_loss, base_loss=5.95, events=8),
            "general_eval": None
            if general is None
            else GeneralEvalSpec(loss=general, base_loss=4.0, events=3, sha256=SHA),
        }
    )


@pytest.mark.parametrize(
    ("general", "bound", "refused"),
    [
        pytest.param(4.5, 0.1, True, id="12.5%-worse-than-the-base-refused"),
        pytest.param(4.4, 0.1, False, id="exactly-at-the-bound-promoted"),
        pytest.param(3.0, 0.0, False, id="better-than-the-base-promoted"),
        pytest.param(4.01, 0.0, True, id="zero-allows-no-drift"),
        pytest.param(9.0, None, False, id="off-promoted"),
        pytest.param(None, 0.1, False, id="no-general-eval-promoted"),
    ],
)
def test_check_general(general: float | None, bound: float | None, refused: bool) -> None:
    from tests.serving.test_gate import _update

    verdict = check_general(_with(_update(1, 1.0), 1.0, general), bound)
    assert (verdict is not None) == refused, verdict
    if verdict is not None:
        assert verdict.reason == "general-regression"


def _refusals(serve: Serve, reason: str) -> float:
    value = serve.metrics.registry.get_sample_value(
        "lorastream_serve_refusals_total", {"adapter": "tutor", "reason": reason}
    )
    return value or 0.0


@pytest.mark.timeout(90)
async def test_a_version_worse_on_the_general_set_only_is_refused_and_one_within_goes_live(
    kafka_bootstrap: str,
    prefix: str,
    server: ContractServer,
    versions: list[AdapterUpdate],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lorastream.serving")
    # Held-out eval improves at every version: --max-regression alone lets all through.
    # v2 drifts 25% above the base on the general set; v3 only 5%.
    v1 = _with(versions[0], 2.0, 4.1)
    v2 = _with(versions[1], 1.5, 5.0)
    v3 = _with(versions[2], 1.4, 4.2)
    topics = await make_topics(kafka_bootstrap, prefix)
    await announce(kafka_bootstrap, topics, [v1])
    config = config_for(kafka_bootstrap, topics, prefix, server, keep=2, max_general_regression=0.1)
    async with running(config) as serve:
        await eventually(lambda: serve.live("tutor") == "tutor-v1", what="v1 live")
        await announce(kafka_bootstrap, topics, [v2])
        await eventually(lambda: _refusals(serve, "general-regression") == 1, what="v2 refused")
        await asyncio.sleep(0.5)  # more than the drain and a poll: nothing may change
        assert serve.live("tutor") == "tutor-v1"

        await announce(kafka_bootstrap, topics, [v3])
        await eventually(lambda: serve.live("tutor") == "tutor-v3", what="v3 live")
    assert server.loads() == ["tutor-v1", "tutor-v3"], "v2 reached the server"
    assert _refusals(serve, "regression") == 0
    refusals = [r for r in caplog.records if r.getMessage().startswith("refused")]
    assert [r.getMessage() for r in refusals] == [
        "refused tutor-v2 (general-regression): general-set loss 5.0000 is above 4.4000, "
        "the base model's (4.0000) plus --max-general-regression 0.1; tutor-v1 stays live"
    ]
    assert refusals[0].levelno == logging.WARNING

    # Without the flag, the same announcements all go live: the gate is the flag's doing.
    plain = config_for(kafka_bootstrap, topics, f"{prefix}plain.", server, keep=2)
    async with running(plain) as again:
        await eventually(lambda: again.live("tutor") == "tutor-v3", what="v3 live")
        assert not again.versions["tutor"].refused
