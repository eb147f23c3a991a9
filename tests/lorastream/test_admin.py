"""Topic retention: the history topics keep everything unless told, and we can say why not."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from lorastream.dev.ports import free_port
from lorastream.ops import admin
from lorastream.ops.admin import (
    KafkaSetupError,
    TopicRetention,
    create_topics,
    describe_retention,
    topic_specs,
)
from lorastream.settings import SettingsError, load_settings
from schemas import Topics
from trainer import kafka
from trainer.kafka import KafkaConnection

# DescribeConfigs' config_source for a value set on the topic itself (KIP-226).
_DYNAMIC_TOPIC_CONFIG = 1


async def _raw_retention_ms(bootstrap: str, names: list[str]) -> dict[str, tuple[str, int]]:
    """``{topic: (retention.ms, config_source)}`` read without lorastream's parser, by the
    field names of aiokafka's response object, so that a bug there cannot hide here."""
    client = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await client.start()
    try:
        responses = await client.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
        )
    finally:
        await client.close()
    found = {}
    for response in responses:
        for resource in response.to_object()["resources"]:
            assert resource["error_code"] == 0, resource
            (entry,) = [
                e for e in resource["config_entries"] if e["config_names"] == "retention.ms"
            ]
            found[resource["resource_name"]] = (entry["config_value"], entry["config_source"])
    assert sorted(found) == sorted(names)
    return found


async def _created(bootstrap: str, prefix: str, **kwargs: int) -> Topics:
    topics = Topics.named(prefix)
    outcome = await create_topics(KafkaConnection(bootstrap), topic_specs(topics, 1, 1, **kwargs))
    assert set(outcome.values()) == {"created"}
    return topics


def _history(topics: Topics) -> list[str]:
    return [topics.learning_events, topics.adapter_updates, topics.quarantine]


@pytest.mark.integration
@pytest.mark.timeout(90)
async def test_history_topics_are_kept_forever_by_default(
    kafka_bootstrap: str, prefix: str
) -> None:
    topics = await _created(kafka_bootstrap, prefix)
    raw = await _raw_retention_ms(kafka_bootstrap, topics.all())
    for name in _history(topics):
        assert raw[name] == ("-1", _DYNAMIC_TOPIC_CONFIG), name
    for name in (topics.generation_results, topics.dead_letters):
        value, source = raw[name]
        assert source != _DYNAMIC_TOPIC_CONFIG, f"{name} should keep the cluster's default"
        assert value != "-1", f"{name}: the test broker's default retention is not unlimited"

    described = await describe_retention(KafkaConnection(kafka_bootstrap), topics.all())
    assert list(described) == topics.all()
    for name in _history(topics):
        assert described[name].retention_ms == -1
        assert described[name].unlimited
        assert described[name].describe() == "unlimited retention"
    results = described[topics.generation_results]
    assert results.retention_ms == int(raw[topics.generation_results][0])
    assert results.cleanup_policy == "delete"
    assert results.retention_bytes is not None
    assert not results.unlimited
    assert results.describe().startswith(f"retention.ms={results.retention_ms} (")


@pytest.mark.integration
@pytest.mark.timeout(90)
async def test_a_configured_history_retention_is_applied(kafka_bootstrap: str, prefix: str) -> None:
    topics = await _created(kafka_bootstrap, prefix, history_retention_ms=86_400_000)
    raw = await _raw_retention_ms(kafka_bootstrap, topics.all())
    described = await describe_retention(KafkaConnection(kafka_bootstrap), topics.all())
    for name in _history(topics):
        assert raw[name] == ("86400000", _DYNAMIC_TOPIC_CONFIG), name
        assert described[name].retention_ms == 86_400_000
        assert described[name].describe() == "retention.ms=86400000 (1 day)"
    assert raw[topics.generation_results][1] != _DYNAMIC_TOPIC_CONFIG


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_describing_a_missing_topic_names_it(kafka_bootstrap: str, prefix: str) -> None:
    with pytest.raises(KafkaSetupError, match=f"{prefix}nowhere") as info:
        await describe_retention(KafkaConnection(kafka_bootstrap), [f"{prefix}nowhere"])
    assert "UnknownTopicOrPartition" in str(info.value)


@pytest.fixture
def admin_clients(monkeypatch: pytest.MonkeyPatch) -> list[AIOKafkaAdminClient]:
    """Every admin client made during the test, to check it was closed (lorastream.ops.admin
    makes its own through trainer.kafka.admin_client)."""
    made: list[AIOKafkaAdminClient] = []

    class Recorded(AIOKafkaAdminClient):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            made.append(self)

    monkeypatch.setattr(kafka, "AIOKafkaAdminClient", Recorded)
    return made


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_the_admin_client_is_closed_after_success_and_refusal(
    kafka_bootstrap: str, prefix: str, admin_clients: list[AIOKafkaAdminClient]
) -> None:
    topics = await _created(kafka_bootstrap, prefix)
    await describe_retention(KafkaConnection(kafka_bootstrap), [topics.adapter_updates])
    with pytest.raises(KafkaSetupError):
        await describe_retention(KafkaConnection(kafka_bootstrap), [f"{prefix}nowhere"])
    assert len(admin_clients) == 3
    assert all(client._closed for client in admin_clients)


@pytest.mark.timeout(60)
async def test_an_unreachable_cluster_is_a_setup_error_naming_the_servers(
    admin_clients: list[AIOKafkaAdminClient],
) -> None:
    servers = f"127.0.0.1:{free_port()}"  # nothing listens there: refused
    with pytest.raises(KafkaSetupError, match=servers):
        await describe_retention(KafkaConnection(servers), ["learning-events"])
    assert len(admin_clients) == 1 and admin_clients[0]._closed


def test_topic_specs_set_retention_on_the_history_topics_only() -> None:
    topics = Topics.named("p.")
    specs = {spec.name: spec.topic_configs for spec in topic_specs(topics, 3, 1, 3_600_000)}
    kept = {"retention.ms": "3600000", "retention.bytes": "-1"}
    assert specs == {
        topics.generation_results: {},
        topics.learning_events: kept,
        topics.adapter_updates: kept,
        topics.adapter_latest: {  # one snapshot per adapter kept, cleaned eagerly
            "cleanup.policy": "compact",
            "min.cleanable.dirty.ratio": "0.01",
            "segment.bytes": "1048576",
            "segment.ms": "60000",
        },
        topics.dead_letters: {},
        topics.quarantine: kept,
    }


@pytest.mark.parametrize(
    ("retention", "phrase"),
    [
        (TopicRetention(604_800_000, -1, "delete"), "retention.ms=604800000 (7 days)"),
        (TopicRetention(86_400_000, -1, "delete"), "retention.ms=86400000 (1 day)"),
        (TopicRetention(90_000_000, -1, "delete"), "retention.ms=90000000 (25 hours)"),
        (TopicRetention(100_000_001, -1, "delete"), "retention.ms=100000001 (about 1.2 days)"),
        (TopicRetention(500, -1, "delete"), "retention.ms=500 (500 ms)"),
        (TopicRetention(-1, -1, "delete"), "unlimited retention"),
        (TopicRetention(-1, 1_073_741_824, "delete"), "retention.bytes=1073741824 per partition"),
        (
            TopicRetention(3_600_000, 1024, "delete"),
            "retention.ms=3600000 (1 hour) and retention.bytes=1024 per partition",
        ),
        (
            TopicRetention(-1, -1, "compact"),
            "compacted (cleanup.policy=compact): only the latest record of each key is kept",
        ),
        (
            TopicRetention(60_000, -1, "compact,delete"),
            "compacted (cleanup.policy=compact,delete): only the latest record of each key "
            "is kept, and retention.ms=60000 (1 minute)",
        ),
        (TopicRetention(1000, -1, ""), "unlimited retention (cleanup.policy is empty)"),
        (TopicRetention(None, None, None), "retention not reported by the cluster"),
    ],
)
def test_describe_phrases(retention: TopicRetention, phrase: str) -> None:
    assert retention.describe() == phrase


@pytest.mark.parametrize(
    ("retention", "unlimited"),
    [
        (TopicRetention(-1, -1, "delete"), True),
        (TopicRetention(5, 5, ""), True),
        (TopicRetention(-1, 1, "delete"), False),
        (TopicRetention(-1, -1, "compact,delete"), False),
        (TopicRetention(-1, None, "delete"), False),
    ],
)
def test_unlimited(retention: TopicRetention, unlimited: bool) -> None:
    assert retention.unlimited is unlimited


def test_configs_as_the_broker_reports_them() -> None:
    configs = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete"}
    assert TopicRetention.from_configs(configs) == TopicRetention(-1, -1, "delete")
    assert TopicRetention.from_configs({"retention.ms": None}) == TopicRetention(None, None, None)


def test_history_retention_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORASTREAM_HISTORY_RETENTION_MS", raising=False)
    assert load_settings().history_retention_ms == -1
    assert load_settings(history_retention_ms=0).history_retention_ms == 0
    monkeypatch.setenv("LORASTREAM_HISTORY_RETENTION_MS", "86400000")
    assert load_settings().history_retention_ms == 86_400_000
    monkeypatch.setenv("LORASTREAM_HISTORY_RETENTION_MS", "-2")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "LORASTREAM_HISTORY_RETENTION_MS (history_retention_ms)" in str(info.value)
    assert "greater than or equal to -1" in str(info.value)


@pytest.mark.integration
async def test_a_producer_right_after_create_topics_meets_a_leader_that_acts_as_one(
    kafka_bootstrap: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The metadata names a new partition's leader a moment before the broker acts as
    it; producing in between logged NotLeaderForPartitionError (6 times in 8 tries)."""
    import logging

    from aiokafka import AIOKafkaProducer

    caplog.set_level(logging.WARNING, logger="aiokafka")
    for attempt in range(3):
        topics = Topics.named(f"{prefix}{attempt}.")
        await admin.create_topics(KafkaConnection(kafka_bootstrap), admin.topic_specs(topics, 3, 1))
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for partition in range(3):
                await producer.send_and_wait(topics.generation_results, b"x", partition=partition)
        finally:
            await producer.stop()
    assert "NotLeaderForPartition" not in caplog.text
