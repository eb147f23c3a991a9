"""Prometheus metrics of the training stage."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["TrainerMetrics"]


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
