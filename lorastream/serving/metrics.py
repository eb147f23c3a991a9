"""Prometheus metrics of the serving stage."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from trainer.metrics import rejected_counter

__all__ = ["ServeMetrics"]


class ServeMetrics:
    """One set per serve loop; a registry of its own keeps tests apart."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.loads = Counter(
            "lorastream_serve_loads_total",
            "Adapter versions the inference server loaded at serve's request.",
            ["adapter"],
            registry=r,
        )
        self.refusals = Counter(
            "lorastream_serve_refusals_total",
            "Adapter versions refused (sha256, missing, manifest, config, rank, bias, base_model, server, "
            "regression, general-regression).",
            ["adapter", "reason"],
            registry=r,
        )
        self.unloads = Counter(
            "lorastream_serve_unloads_total",
            "Adapter versions unloaded after their drain period.",
            ["adapter"],
            registry=r,
        )
        self.unconfirmed = Counter(
            "lorastream_serve_unconfirmed_loads_total",
            "Loads the server answered with success but did not list afterwards (each is "
            "tried again; none is routed to).",
            ["adapter"],
            registry=r,
        )
        self.live = Gauge(
            "lorastream_serve_live_version",
            "The version requests for the adapter reach now (its newest loaded version).",
            ["adapter"],
            registry=r,
        )
        self.server_up = Gauge(
            "lorastream_serve_server_up",
            "1 while the inference server answers, 0 while it is unreachable or failing.",
            registry=r,
        )
        self.rejected = rejected_counter(r)

    def reject(self, reason: str) -> None:
        """An announcement the follower skipped (trainer.signing.Verifier)."""
        self.rejected.labels(reason).inc()
