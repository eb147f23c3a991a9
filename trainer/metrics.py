"""Prometheus metrics of the training stage."""

from __future__ import annotations

import functools

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ReplayMetrics", "TrainerMetrics", "reader_rejections", "rejected_counter"]


def rejected_counter(registry: CollectorRegistry) -> Counter:
    """Records on adapter-updates (or its snapshots) a reader skipped, by reason
    (:data:`trainer.signing.REASONS`); each record counts once per reader."""
    return Counter(
        "lorastream_announcements_rejected_total",
        "Announcements and snapshots skipped as untrusted: unsigned, signature, order, "
        "location, unreadable.",
        ["reason"],
        registry=registry,
    )


@functools.cache
def reader_rejections() -> Counter:
    """The process's counter for one-shot readers (status, adapters list/follow/fetch),
    in the default registry."""
    return rejected_counter(REGISTRY)


class TrainerMetrics:
    """One set per trainer; a registry of its own keeps tests apart."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.windows = Counter(
            "lorastream_windows_trained_total", "Windows trained and announced.", registry=r
        )
        self.quarantined = Counter(
            "lorastream_quarantined_total", "Windows or records quarantined.", registry=r
        )
        # The same, per adapter, counted by the live trainer ("unknown": an unreadable record
        # whose key is no adapter name).
        self.adapter_quarantined = Counter(
            "lorastream_adapter_quarantined_total",
            "Windows or records the live trainer quarantined, per adapter.",
            ["adapter"],
            registry=r,
        )
        self.lag = Gauge(
            "lorastream_consumer_lag",
            "Records of an assigned learning-events partition past the trainer group's "
            "committed offset (last stable offset minus committed; the log start where none "
            "is committed), as `lorastream status` counts the trainer's lag.",
            ["topic", "partition"],
            registry=r,
        )
        self.skipped = Counter(
            "lorastream_events_skipped_total", "Events already trained or re-read.", registry=r
        )
        self.step_failures = Counter(
            "lorastream_step_failures_total", "Failed step tries.", registry=r
        )
        self.step_seconds = Histogram(
            "lorastream_step_seconds",
            "Seconds per LoRA step try.",
            registry=r,
            buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100),
        )
        self.version = Gauge(
            "lorastream_adapter_version", "Newest announced version.", ["adapter"], registry=r
        )
        self.pending = Gauge(
            "lorastream_pending_events",
            "Events waiting in an open (partial) window.",
            ["adapter"],
            registry=r,
        )
        self.loss = Gauge(
            "lorastream_train_loss", "Loss of the newest window.", ["adapter"], registry=r
        )
        self.rejected = rejected_counter(r)
        self.held = Gauge(
            "lorastream_adapter_held",
            "1 while an adapter is on hold (a file of its newest version is missing, corrupt "
            "or not as announced, or a LoRA setting differs from its lineage's), else 0.",
            ["adapter"],
            registry=r,
        )

    def reject(self, reason: str) -> None:
        """A record on adapter-updates the resume skipped (trainer.signing.Verifier)."""
        self.rejected.labels(reason).inc()


class ReplayMetrics:
    """One set per ``lorastream replay`` run."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "lorastream_replay_events_read_total",
            "Learning events the replay read and admitted to a window.",
            registry=r,
        )
        self.windows = Counter(
            "lorastream_replay_windows_total",
            "Windows the replay closed, trained or quarantined.",
            ["outcome"],
            registry=r,
        )
        self.announced = Counter(
            "lorastream_replay_versions_announced_total",
            "Versions the replay announced (committed with their window).",
            registry=r,
        )
        self.version = Gauge(
            "lorastream_replay_version",
            "Newest version the replay announced in its target lineage.",
            ["adapter"],
            registry=r,
        )
