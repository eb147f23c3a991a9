"""The one place that wires the stages: each stage's configuration, built from the settings.

The stages (``streams``, ``trainer``, ``lorastream.serving``) take plain, frozen configurations and
never read the environment; the CLI, the demo and the tests build those
configurations here and nowhere else. A new stage adds its builder here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from lorastream.settings import Settings
from schemas import KafkaPosition, LearningEvent
from streams import ScoringConfig, Thresholds, process

if TYPE_CHECKING:  # the trainer imports torch: the scorer must not pay for it
    from collections.abc import Callable

    from lorastream.serving import ServeConfig
    from trainer.config import LoraSettings, ReplayConfig, TrainerConfig, TrainingConfig
    from trainer.general import GeneralSet
    from trainer.ranges import Bound
    from trainer.replay import Decoder
    from trainer.signing import Verifier

__all__ = [
    "announcement_verifier",
    "reader_verifier",
    "replay_config",
    "replay_decoder",
    "rescoring_decoder",
    "scoring_config",
    "serve_config",
    "trainer_config",
    "training_config",
]


def announcement_verifier(
    settings: Settings, on_reject: Callable[[str], None] | None = None
) -> Verifier:
    """What readers of adapter-updates trust: records signed with LORASTREAM_ANNOUNCE_KEY
    (when set) whose files lie under LORASTREAM_ADAPTER_DIR (its bucket and prefix, for
    an object store); the committers sign with the same key.

    The location is always checked: a reader trusts no file outside the adapter directory
    it is configured with. The default, ``./adapters``, is relative to the working
    directory, so a reader started elsewhere than the trainer (``status``, ``serve``)
    needs LORASTREAM_ADAPTER_DIR, and says so in the line that skips a version."""
    from trainer.signing import Verifier

    return Verifier(settings.announce_key_bytes, settings.adapter_dir, on_reject)


def reader_verifier(settings: Settings) -> Verifier:
    """:func:`announcement_verifier` for a one-shot reader (status, adapters list/follow/
    fetch, quarantine retry): skipped records count in the process's default registry."""
    from trainer.metrics import reader_rejections

    counter = reader_rejections()
    return announcement_verifier(settings, lambda reason: counter.labels(reason).inc())


def scoring_config(settings: Settings) -> ScoringConfig:
    return ScoringConfig(
        bootstrap_servers=settings.bootstrap_servers,
        topics=settings.topics,
        app_id=settings.scorer_app_id,
        thresholds=settings.thresholds,
        data_dir=settings.home / "faust",
        credentials=settings.faust_credentials(),
    )


def lora_settings(settings: Settings) -> LoraSettings:
    from trainer.config import LoraSettings

    lora = LoraSettings(
        r=settings.lora_r,
        alpha=settings.lora_alpha,
        dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        steps_per_window=settings.steps_per_window,
        max_length=settings.max_length,
        token_budget=settings.token_budget,
        gradient_checkpointing=settings.gradient_checkpointing,
        compile=settings.compile,
    )
    if settings.learning_rate is None:
        return lora  # LoraSettings' own default
    return replace(lora, learning_rate=settings.learning_rate)


def base_model_of(settings: Settings) -> tuple[Path, str]:
    """The base model's directory and name; the built-in tiny model is made on first use."""
    from trainer.model import default_tiny_model_dir

    # The name announced is the directory's absolute path, the built-in model's too: an
    # AdapterUpdate alone then tells a server where the base model lies.
    directory = settings.base_model or default_tiny_model_dir(settings.home)
    return directory, str(directory.resolve())


def training_config(settings: Settings) -> TrainingConfig:
    from trainer.config import TrainingConfig

    base_model, base_name = base_model_of(settings)
    return TrainingConfig(
        adapter_dir=settings.adapter_dir,
        base_model=base_model,
        base_model_name=base_name,
        window_size=settings.window_size,
        max_tries=settings.max_tries,
        seed=settings.seed,
        device=settings.device,
        lora=lora_settings(settings),
        faults=settings.faults,
        eval_fraction=settings.eval_fraction,
        eval_size=settings.eval_size,
        cache_dir=settings.adapter_cache_dir,
        rehearsal=settings.rehearsal,
        rehearsal_buffer=settings.rehearsal_buffer,
        eval_segment_windows=settings.eval_segment_windows,
        general_eval=general_set(settings),
        adapters_per_step=settings.adapters_per_step,
    )


def general_set(settings: Settings) -> GeneralSet | None:
    """The general set of LORASTREAM_GENERAL_EVAL, read now (None when unset): a file that is
    missing or bad stops the stage before it starts, in one line naming the variable."""
    from lorastream.settings import SettingsError, variable_of
    from trainer.general import GeneralSetError, read_general_set

    if settings.general_eval is None:
        return None
    try:
        return read_general_set(settings.general_eval)
    except GeneralSetError as exc:
        raise SettingsError(f"{variable_of('general_eval')}: {exc}") from exc


def trainer_config(settings: Settings) -> TrainerConfig:
    from trainer.config import InstanceId, TrainerConfig

    return TrainerConfig(
        kafka=settings.kafka_connection(),
        topics=settings.topics,
        group_id=settings.trainer_group_id,
        instance=InstanceId(
            prefix=settings.trainer_id_prefix,
            explicit=settings.instance_id,
            lock_dir=settings.home / "trainers",
        ),
        training=training_config(settings),
        max_wait_seconds=settings.max_wait_seconds,
        hold_recheck_seconds=settings.hold_recheck_seconds,
        verifier=announcement_verifier(settings),
    )


def replay_config(
    settings: Settings,
    *,
    source: str | None,
    target: str | None,
    rescore: bool = False,
    start: Bound | None = None,
    end: Bound | None = None,
    resume: bool = False,
) -> ReplayConfig:
    from trainer.config import ReplayConfig

    topics = settings.topics
    return ReplayConfig(
        kafka=settings.kafka_connection(),
        topics=topics,
        topic=topics.generation_results if rescore else topics.learning_events,
        source=source,
        target=target,
        transactional_id=settings.replay_transactional_id(target or "dry-run"),
        training=training_config(settings),
        start=start,
        end=end,
        resume=resume,
        verifier=announcement_verifier(settings),
    )


def serve_config(
    settings: Settings,
    *,
    backend: str,
    url: str,
    keep: int,
    drain: float,
    adapters: list[str],
    max_lora_rank: int,
    served_base: str | None,
    poll: float,
    max_regression: float = 0.02,
    name: str | None = None,
    max_general_regression: float | None = None,
) -> ServeConfig:
    """Serve's configuration: the settings for Kafka, the topic, the trust and the cache;
    the rest comes from ``lorastream serve``'s flags. ``url`` must be an http(s) URL with
    a host (:class:`~lorastream.serving.exceptions.ServeUrlError`); the consumer group, and
    the lock under the home that keeps a second serve for one server off this machine, are
    named after ``name`` or else the URL (:mod:`lorastream.serving.instance`)."""
    from lorastream.serving import ServeConfig
    from lorastream.serving.instance import normalise_url, serve_group

    normalise_url(url)
    group_id = serve_group(settings.topic_prefix, url, name)
    trainer_base = str(settings.base_model.resolve()) if settings.base_model else None
    return ServeConfig(
        kafka=settings.kafka_connection(),
        updates_topic=settings.topics.adapter_updates,
        group_id=group_id,
        name=name,
        lock_dir=settings.home / "serves",
        backend="vllm" if backend == "vllm" else "sglang",
        url=url,
        keep=keep,
        drain_seconds=drain,
        max_regression=max_regression,
        max_general_regression=max_general_regression,
        adapters=frozenset(adapters),
        max_lora_rank=max_lora_rank,
        served_base=served_base,
        trainer_base=trainer_base,
        poll_seconds=poll,
        cache_dir=settings.adapter_cache_dir,
        verifier=announcement_verifier(settings),
    )


def rescoring_decoder(adapter: str | None, thresholds: Thresholds) -> Decoder:
    """GenerationResult records → the LearningEvents that qualify under ``thresholds``,
    by the scoring stage's own function, so a re-score is the live rule exactly."""

    def decoder(record: object) -> LearningEvent | None:
        position = KafkaPosition(record.topic, record.partition, record.offset)  # type: ignore[attr-defined]
        outcome = process(record.value, position, record.timestamp, thresholds)  # type: ignore[attr-defined]
        if outcome.error is not None:
            raise outcome.error
        event = outcome.event
        return event if event is not None and adapter in (None, event.adapter) else None

    return decoder


def replay_decoder(settings: Settings, source: str | None, rescore: bool) -> Decoder:
    from trainer.replay import learning_event_decoder

    if rescore:
        return rescoring_decoder(source, settings.thresholds)
    return learning_event_decoder(source)
