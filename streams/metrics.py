"""Prometheus counters of the scoring stage."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

__all__ = ["ScoringMetrics"]


class ScoringMetrics:
    """One set of counters per worker; a registry of its own keeps tests apart."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.scored = Counter(
            "lorastream_scored_total", "Valid GenerationResults scored.", registry=self.registry
        )
        self.qualified = Counter(
            "lorastream_learning_events_total",
            "Results that qualified and were published as LearningEvents.",
            registry=self.registry,
        )
        self.breakthroughs = Counter(
            "lorastream_breakthroughs_total",
            "LearningEvents flagged as breakthroughs.",
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "lorastream_dead_letters_total",
            "Records sent to the dead-letter topic.",
            registry=self.registry,
        )
        self.send_retries = Counter(
            "lorastream_send_retries_total",
            "Sends tried again after a failure the broker may get over.",
            registry=self.registry,
        )
        self.scoring_errors = Counter(
            "lorastream_scoring_errors_total",
            "Records whose scoring raised unexpectedly; each became a dead letter.",
            registry=self.registry,
        )
