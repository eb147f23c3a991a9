"""Hostile announcements on the real broker (issue #20, part 4): a forged (unsigned, or
signed with another key), an out-of-order (v99) and an out-of-tree announcement are
each skipped by ``serve`` and by ``status``, logged once and counted; both go on, and
the next version the real Committer announces goes live."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY

from lorastream.dev.topics import make_topics
from lorastream.dev.workers import LORASTREAM
from lorastream.ops.status import read_status
from lorastream.settings import load_settings
from schemas import AdapterUpdate, Topics, encode
from tests.kafka_util import read_all
from tests.serving.conftest import Trained
from tests.serving.contract import contract_server
from tests.serving.helpers import config_for, eventually, running
from trainer.committer import Committer, Outgoing
from trainer.kafka import KafkaConnection
from trainer.signing import SIGNATURE_HEADER, WRITER_HEADER, Verifier, signed_headers

pytestmark = pytest.mark.timeout(120)

KEY = b"0123456789abcdef0123456789abcdef"
REASONS = ("unsigned", "signature", "order", "location")


async def _send(
    bootstrap: str, topic: str, records: list[tuple[AdapterUpdate, list[tuple[str, bytes]]]]
) -> list[int]:
    """Plain, non-transactional writes, as anyone with write access could make them."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        sent = [
            await producer.send(topic, key=u.adapter.encode(), value=encode(u), headers=h)
            for u, h in records
        ]
        return [(await s).offset for s in sent]
    finally:
        await producer.stop()


def _forge(
    update: AdapterUpdate, writer: str, key: bytes | None
) -> tuple[AdapterUpdate, list[tuple[str, bytes]]]:
    value = encode(update)
    return update, signed_headers(writer, key, update.adapter.encode(), value)


def _rejected(reason: str) -> float:
    return (
        REGISTRY.get_sample_value("lorastream_announcements_rejected_total", {"reason": reason})
        or 0.0
    )


def _status_cli(
    bootstrap: str, prefix: str, root: Path, home: Path
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "LORASTREAM_TOPIC_PREFIX": prefix,
        "LORASTREAM_ADAPTER_DIR": str(root),
        "LORASTREAM_ANNOUNCE_KEY": KEY.decode(),
        "LORASTREAM_HOME": str(home),
    }
    return subprocess.run(
        [LORASTREAM, "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )


async def test_forged_out_of_order_and_out_of_tree_announcements_are_skipped_by_serve_and_status(
    kafka_bootstrap: str,
    prefix: str,
    trained: Trained,
    versions: list[AdapterUpdate],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="trainer.signing")
    topics = await make_topics(kafka_bootstrap, prefix)
    root = tmp_path / "adapters"  # where the `versions` fixture keeps its copies
    writer = f"{prefix}lorastream-trainer-0"
    elsewhere = tmp_path / "elsewhere" / "tutor" / "v2"
    shutil.copytree(versions[1].uri, elsewhere)  # real files, outside the adapter directory

    committer = Committer(KafkaConnection(kafka_bootstrap), writer, announce_key=KEY)
    await committer.start()
    try:
        await committer.commit([Outgoing(topics.adapter_updates, "tutor", encode(versions[0]))])
        # Before serve starts (it meets them in the history it reads first): v2 from a plain
        # producer, unsigned; and v2 signed with a key that is not the cluster's.
        early = await _send(
            kafka_bootstrap,
            topics.adapter_updates,
            [_forge(versions[1], writer, None), _forge(versions[1], writer, b"x" * 32)],
        )
        verifier = Verifier(KEY, str(root))
        async with contract_server("vllm", base=str(trained.model_dir)) as server:
            config = config_for(kafka_bootstrap, topics, prefix, server, keep=2, verifier=verifier)
            async with running(config) as serve:
                await eventually(lambda: serve.live("tutor") == "tutor-v1", what="v1 live")
                # While serve follows: a correctly signed v99, and a signed v2 whose files lie
                # outside the adapter directory.
                v99 = versions[1].model_copy(
                    update={"version": 99, "parent_version": 98, "uri": str(root / "tutor" / "v99")}
                )
                out = versions[1].model_copy(update={"uri": str(elsewhere)})
                late = await _send(
                    kafka_bootstrap,
                    topics.adapter_updates,
                    [_forge(v99, writer, KEY), _forge(out, writer, KEY)],
                )

                def counted() -> bool:
                    registry = serve.metrics.registry
                    return all(
                        registry.get_sample_value(
                            "lorastream_announcements_rejected_total", {"reason": r}
                        )
                        == 1
                        for r in REASONS
                    )

                await eventually(counted, what="each forged record counted once by serve")
                await asyncio.sleep(1.0)  # the follower re-reads them: still counted once
                assert counted()
                assert serve.live("tutor") == "tutor-v1"
                assert sorted(serve.versions["tutor"].updates) == [1]
                assert set(server.loaded) == {"tutor-v1"}
                lines = [r.getMessage() for r in caplog.records if r.name == "trainer.signing"]
                assert len(lines) == 4, lines
                for offset, reason in zip([*early, *late], REASONS, strict=True):
                    where = f"{topics.adapter_updates}[0]@{offset} ({reason})"
                    assert sum(where in line for line in lines) == 1, (where, lines)
                assert any("tutor v99 follows v1" in line for line in lines), lines
                assert any(str(elsewhere) in line for line in lines), lines

                # status, in this process: the lineage without them, each counted once.
                before = {r: _rejected(r) for r in REASONS}
                settings = load_settings(
                    bootstrap_servers=kafka_bootstrap,
                    topic_prefix=prefix,
                    adapter_dir=str(root),
                    announce_key=KEY.decode(),
                    home=tmp_path / "home",
                )
                status = await read_status(settings)
                assert [(a.adapter, a.version) for a in status.adapters] == [("tutor", 1)]
                assert {r: _rejected(r) - before[r] for r in REASONS} == dict.fromkeys(REASONS, 1)

                # `lorastream status` as a user runs it: exit 0, v1, one line per record.
                ran = await asyncio.to_thread(
                    _status_cli, kafka_bootstrap, prefix, root, tmp_path / "home"
                )
                assert ran.returncode == 0, ran.stderr
                shown = json.loads(ran.stdout)["adapters"]
                assert [(a["adapter"], a["version"]) for a in shown] == [("tutor", 1)], shown
                skipped = [
                    line for line in ran.stderr.splitlines() if "skipping the record" in line
                ]
                assert len(skipped) == 4, ran.stderr

                # The next real version, from the real committer, goes live.
                await committer.commit(
                    [Outgoing(topics.adapter_updates, "tutor", encode(versions[1]))]
                )
                await eventually(lambda: serve.live("tutor") == "tutor-v2", what="v2 live")
                assert server.loaded["tutor-v2"] == versions[1].uri
    finally:
        await committer.stop()


async def test_the_committer_always_names_its_writer_and_signs_only_with_a_key(
    kafka_bootstrap: str, prefix: str
) -> None:
    topics: Topics = await make_topics(kafka_bootstrap, prefix)
    for key in (None, KEY):
        committer = Committer(
            KafkaConnection(kafka_bootstrap), f"{prefix}lorastream-replay-new", announce_key=key
        )
        await committer.start()
        try:
            await committer.commit([Outgoing(topics.adapter_updates, "new", b"{}")])
        finally:
            await committer.stop()
    records = await read_all(kafka_bootstrap, topics.adapter_updates, 2, settle=0.5)
    unsigned, signed = (dict(r.headers) for r in records)
    assert unsigned == {WRITER_HEADER: f"{prefix}lorastream-replay-new".encode()}
    assert signed[WRITER_HEADER] == f"{prefix}lorastream-replay-new".encode()
    assert Verifier(KEY).signature_problem(records[1]) is None
    assert Verifier(KEY).signature_problem(records[0]) == (
        "unsigned",
        f"no {SIGNATURE_HEADER} header, and LORASTREAM_ANNOUNCE_KEY is set",
    )


async def test_adapters_follow_shows_only_the_next_signed_versions(
    kafka_bootstrap: str, prefix: str, versions: list[AdapterUpdate]
) -> None:
    from lorastream.ops.follow import follow

    topics = await make_topics(kafka_bootstrap, prefix)
    writer = f"{prefix}lorastream-trainer-0"
    committer = Committer(KafkaConnection(kafka_bootstrap), writer, announce_key=KEY)
    await committer.start()
    try:
        await committer.commit([Outgoing(topics.adapter_updates, "tutor", encode(versions[0]))])
        v99 = versions[1].model_copy(update={"version": 99, "parent_version": 98})
        await _send(
            kafka_bootstrap,
            topics.adapter_updates,
            [_forge(versions[1], writer, None), _forge(v99, writer, KEY)],
        )
        await committer.commit([Outgoing(topics.adapter_updates, "tutor", encode(versions[1]))])
    finally:
        await committer.stop()
    seen: list[int] = []
    reasons: list[str] = []
    count = await follow(
        KafkaConnection(kafka_bootstrap),
        topics.adapter_updates,
        lambda update, _raw: seen.append(update.version),
        from_beginning=True,
        timeout=5,
        verifier=Verifier(KEY, on_reject=reasons.append),
    )
    assert (count, seen, sorted(reasons)) == (2, [1, 2], ["order", "unsigned"])
