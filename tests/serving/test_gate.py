"""The promotion gate: a version whose held-out eval loss regresses is never loaded.

The rule (:func:`check_regression`) as a table with no network; the gate's bookkeeping
in :class:`Serve` with no broker or server; then serve against the vLLM and SGLang
contract servers on the real broker, with real adapter files and ``eval`` set on their
announcements.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lorastream.dev.topics import make_topics
from lorastream.serving import Serve, ServeConfig
from lorastream.serving.verify import check_regression
from schemas import AdapterUpdate, EvalSpec, LoraSpec, WindowSpec
from tests.serving.contract import ContractServer
from tests.serving.helpers import announce, config_for, eventually, running
from trainer.kafka import KafkaConnection


def _update(version: int, loss: float | None, adapter: str = "tutor") -> AdapterUpdate:
    return AdapterUpdate(
        adapter=adapter,
        version=version,
        parent_version=version - 1 or None,
        base_model="/models/base",
        uri=f"/nowhere/{adapter}/v{version}",
        sha256="0" * 64,
        lora=LoraSpec(r=8, alpha=16, target_modules=["q_proj"]),
        window=WindowSpec(
            topic="learning-events",
            partition=0,
            first_offset=4 * (version - 1),
            last_offset=4 * version - 1,
            size=4,
            event_ids=[f"e{4 * (version - 1) + n}" for n in range(4)],
        ),
        train_loss=2.0,
        created_at=datetime(2026, 11, 27, tzinfo=UTC),
        eval=None if loss is None else EvalSpec(loss=loss, base_loss=5.95, events=8),
    )


def _with_eval(update: AdapterUpdate, loss: float) -> AdapterUpdate:
    return update.model_copy(update={"eval": EvalSpec(loss=loss, base_loss=5.95, events=8)})


# -- the rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("new", "live", "max_regression", "refused"),
    [
        pytest.param(3.0, [2.0, 1.5], 0.02, True, id="worse-than-the-best-live-refused"),
        pytest.param(1.52, [2.0, 1.5], 0.02, False, id="within-2%-of-the-best-promoted"),
        pytest.param(1.531, [2.0, 1.5], 0.02, True, id="just-past-2%-refused"),
        pytest.param(1.53, [1.5], 0.02, False, id="exactly-at-the-threshold-promoted"),
        pytest.param(1.9, [2.0, 1.5], 0.02, True, id="better-than-one-live-but-not-the-best"),
        pytest.param(1.2, [2.0, 1.5], 0.0, False, id="an-improvement-always-promoted"),
        pytest.param(1.51, [1.5], 0.0, True, id="zero-allows-no-regression"),
        pytest.param(3.0, [1.5], 1.0, False, id="a-wide-margin-lets-it-through"),
        pytest.param(None, [1.5], 0.02, False, id="no-eval-on-the-new-version-promoted"),
        pytest.param(9.0, [None, None], 0.02, False, id="no-live-version-with-eval-promoted"),
        pytest.param(9.0, [], 0.02, False, id="nothing-live-promoted"),
        pytest.param(1.6, [None, 1.5], 0.02, True, id="live-versions-without-eval-ignored"),
    ],
)
def test_check_regression(
    new: float | None, live: list[float | None], max_regression: float, refused: bool
) -> None:
    lives = [_update(n + 1, loss) for n, loss in enumerate(live)]
    verdict = check_regression(_update(len(live) + 1, new), lives, max_regression)
    assert (verdict is not None) == refused, verdict
    if verdict is not None:
        assert verdict.reason == "regression"


def test_a_refusal_names_the_eval_loss_the_best_live_version_and_the_threshold() -> None:
    verdict = check_regression(_update(3, 3.0), [_update(1, 2.0), _update(2, 1.5)], 0.02)
    assert verdict is not None
    assert verdict.detail == (
        "eval loss 3.0000 is above 1.5300, the best live version's (v2: 1.5000) plus "
        "--max-regression 0.02"
    )


# -- the gate's bookkeeping in serve ---------------------------------------------------------


def _serve(keep: int = 2, max_regression: float = 0.02) -> Serve:
    return Serve(
        ServeConfig(
            kafka=KafkaConnection("127.0.0.1:1"),
            updates_topic="adapter-updates",
            group_id="g",
            backend="vllm",
            url="http://127.0.0.1:1",
            keep=keep,
            max_regression=max_regression,
        )
    )


def _verdicts(serve: Serve) -> dict[int, str | None]:
    serve.reconciler.judge("tutor")
    gate = serve.versions["tutor"].gate
    return {v: r.reason if r else None for v, r in sorted(gate.items())}


def test_later_versions_are_judged_against_the_best_of_the_newest_keep_let_through() -> None:
    serve = _serve(keep=2)
    for version, loss in [(1, 2.0), (2, 1.5), (3, 3.0), (4, 1.52), (5, None), (6, 1.545)]:
        serve.follower.announce(_update(version, loss))
    # v6 is compared with v4 and v5 (v3 was refused; v2 fell out of the newest two):
    # 1.545 is within 2% of v4's 1.52.
    assert _verdicts(serve) == {1: None, 2: None, 3: "regression", 4: None, 5: None, 6: None}
    assert serve.versions["tutor"].promoted == [1, 2, 4, 5, 6]


def test_the_verdicts_do_not_depend_on_how_the_announcements_were_batched() -> None:
    losses = [(1, 2.0), (2, 1.5), (3, 3.0), (4, 1.52), (5, 1.7)]
    at_once = _serve()
    for version, loss in losses:
        at_once.follower.announce(_update(version, loss))
    one_by_one = _serve()
    for version, loss in losses:
        one_by_one.follower.announce(_update(version, loss))
        one_by_one.reconciler.judge("tutor")
    assert _verdicts(at_once) == _verdicts(one_by_one)
    assert _verdicts(at_once)[5] == "regression"


# -- serve against the contract servers ------------------------------------------------------


def _refusals(serve: Serve) -> float:
    value = serve.metrics.registry.get_sample_value(
        "lorastream_serve_refusals_total", {"adapter": "tutor", "reason": "regression"}
    )
    return value or 0.0


def _names(*versions: int) -> list[str]:
    return [f"tutor-v{v}" for v in versions]


@pytest.mark.timeout(90)
async def test_a_version_that_regresses_is_never_loaded_and_the_best_one_stays_live(
    kafka_bootstrap: str,
    prefix: str,
    server: ContractServer,
    versions: list[AdapterUpdate],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lorastream.serving")
    v1, v2, v3, v4 = (
        _with_eval(u, loss) for u, loss in zip(versions, [2.0, 1.5, 3.0, 1.52], strict=True)
    )
    topics = await make_topics(kafka_bootstrap, prefix)
    await announce(kafka_bootstrap, topics, [v1, v2])
    config = config_for(kafka_bootstrap, topics, prefix, server, keep=2, drain_seconds=0.2)
    async with running(config) as serve:
        await eventually(lambda: serve.live("tutor") == "tutor-v2", what="v2 live")

        await announce(kafka_bootstrap, topics, [v3])
        await eventually(lambda: _refusals(serve) == 1, what="v3 refused")
        await asyncio.sleep(0.5)  # more than the drain and a poll: nothing may change
        assert serve.live("tutor") == "tutor-v2"
        assert set(server.loaded) == set(_names(1, 2))

        await announce(kafka_bootstrap, topics, [v4])
        await eventually(lambda: serve.live("tutor") == "tutor-v4", what="v4 live")
        await eventually(lambda: server.unloads() == _names(1), what="v1 unloaded")
        assert set(server.loaded) == set(_names(2, 4))

    assert server.loads() == _names(1, 2, 4), "v3 never reached the server"
    assert _refusals(serve) == 1

    refusals = [r for r in caplog.records if r.getMessage().startswith("refused")]
    assert [r.getMessage() for r in refusals] == [
        "refused tutor-v3 (regression): eval loss 3.0000 is above 1.5300, the best live "
        "version's (v2: 1.5000) plus --max-regression 0.02; tutor-v2 stays live"
    ]
    assert refusals[0].levelno == logging.WARNING

    async with running(config) as again:  # a serve that starts again: the same verdict
        await eventually(lambda: again.live("tutor") == "tutor-v4", what="v4 live again")
        assert 3 in again.versions["tutor"].refused
    assert server.loads() == _names(1, 2, 4)


@pytest.mark.timeout(90)
async def test_a_version_trained_worse_on_purpose_is_refused_and_the_previous_stays_live(
    kafka_bootstrap: str, prefix: str, server: ContractServer, worsened: list[AdapterUpdate]
) -> None:
    """No fabricated losses: v5 is a window of garbage at ten times the learning rate, and
    the trainer's own evaluation on the same held-out events says it regressed."""
    *good, bad = worsened
    assert [u.version for u in worsened] == [1, 2, 3, 4, 5]
    assert all(u.eval is not None for u in worsened)
    losses = [u.eval.loss for u in good]  # type: ignore[union-attr]
    assert losses == sorted(losses, reverse=True), f"the good versions did not learn: {losses}"
    assert bad.eval is not None and good[-1].eval is not None
    assert bad.eval.events == good[-1].eval.events, "the evaluation set changed"
    assert bad.eval.loss > good[-1].eval.loss * 1.1, (bad.eval, good[-1].eval)

    topics = await make_topics(kafka_bootstrap, prefix)
    await announce(kafka_bootstrap, topics, good)
    config = config_for(kafka_bootstrap, topics, prefix, server, keep=2, drain_seconds=0.2)
    async with running(config) as serve:
        await eventually(lambda: serve.live("tutor") == "tutor-v4", what="v4 live")
        await announce(kafka_bootstrap, topics, [bad])
        await eventually(lambda: _refusals(serve) == 1, what="v5 refused")
        await asyncio.sleep(0.5)  # more than the drain and a poll: nothing may change
        assert serve.live("tutor") == "tutor-v4"
        assert 5 in serve.versions["tutor"].refused
    assert "tutor-v5" not in server.loads(), "the worse version reached the server"
    assert server.loads()[-1] == "tutor-v4"


@pytest.mark.timeout(90)
async def test_max_regression_wide_enough_lets_a_worse_version_through(
    kafka_bootstrap: str, prefix: str, server: ContractServer, versions: list[AdapterUpdate]
) -> None:
    v1, v2, v3 = (
        _with_eval(u, loss) for u, loss in zip(versions[:3], [2.0, 1.5, 3.0], strict=True)
    )
    topics = await make_topics(kafka_bootstrap, prefix)
    await announce(kafka_bootstrap, topics, [v1, v2, v3])
    # 3.0 is exactly 1.5 * (1 + 1.0): not worse by more than 100%.
    config = config_for(kafka_bootstrap, topics, prefix, server, keep=2, max_regression=1.0)
    async with running(config) as serve:
        await eventually(lambda: serve.live("tutor") == "tutor-v3", what="v3 live")
    assert server.loads() == _names(2, 3)
    assert _refusals(serve) == 0


@pytest.mark.timeout(90)
async def test_versions_without_eval_are_promoted_as_before(
    kafka_bootstrap: str, prefix: str, server: ContractServer, versions: list[AdapterUpdate]
) -> None:
    # No eval on v1 and v2 (no held-out events yet): v3's bad eval has nothing to compare
    # with; v4 has no eval and goes live after a measured v3.
    v1, v2, v4 = (versions[n].model_copy(update={"eval": None}) for n in (0, 1, 3))
    v3 = _with_eval(versions[2], 9.0)
    topics = await make_topics(kafka_bootstrap, prefix)
    await announce(kafka_bootstrap, topics, [v1, v2])
    config = config_for(kafka_bootstrap, topics, prefix, server, keep=2)
    async with running(config) as serve:
        await eventually(lambda: serve.live("tutor") == "tutor-v2", what="v2 live")
        await announce(kafka_bootstrap, topics, [v3, v4])
        await eventually(lambda: serve.live("tutor") == "tutor-v4", what="v4 live")
    assert server.loads() == _names(1, 2, 3, 4)
    assert _refusals(serve) == 0


# -- adapters list marks what the gate refuses -----------------------------------------------


def test_adapters_list_marks_the_version_the_gate_refuses(
    kafka_bootstrap: str, prefix: str, worsened: list[AdapterUpdate]
) -> None:
    from typer.testing import CliRunner

    from lorastream.cli import app

    async def setup() -> None:
        topics = await make_topics(kafka_bootstrap, prefix)
        await announce(kafka_bootstrap, topics, worsened)

    asyncio.run(setup())
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "LORASTREAM_TOPIC_PREFIX": prefix,
        "LORASTREAM_ADAPTER_DIR": str(Path(worsened[0].uri).parents[1]),
    }

    def listed(*flags: str) -> str:
        result = CliRunner().invoke(app, ["adapters", "list", *flags], env=env, terminal_width=200)
        assert result.exit_code == 0, result.output
        return result.output

    output = listed()
    rows = {int(m[1]): m[0] for m in re.finditer(r"^│ tutor\s+│\s+(\d+) .*$", output, re.M)}
    assert sorted(rows) == [1, 2, 3, 4, 5], output
    assert [v for v, row in rows.items() if "REFUSED" in row] == [5], output
    bad, good = worsened[4].eval, worsened[3].eval
    assert bad is not None and good is not None
    assert (
        f"tutor v5: REFUSED by the promotion gate (serve --keep 2 --max-regression 0.02): "
        f"eval loss {bad.loss:.4f} is above {good.loss * 1.02:.4f}, the best live version's "
        f"(v4: {good.loss:.4f}) plus --max-regression 0.02"
    ) in " ".join(output.split())
    assert "REFUSED" not in listed("--max-regression", "1")
