"""The topic names of the pipeline, with an optional prefix for all of them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Topics"]


@dataclass(frozen=True)
class Topics:
    """Every topic lorastream reads or writes.

    ``Topics.named(prefix)`` prefixes each default name, so that several
    pipelines (or test runs) share one cluster without seeing each other.
    """

    generation_results: str = "generation-results"
    learning_events: str = "learning-events"
    adapter_updates: str = "adapter-updates"
    # Compacted: each adapter's newest lineage snapshot (trainer.snapshot), for a resume
    # that reads one record per adapter instead of the whole history.
    adapter_latest: str = "adapter-updates.latest"
    dead_letters: str = "generation-results.dlq"
    quarantine: str = "learning-events.quarantine"

    @classmethod
    def named(cls, prefix: str = "") -> Topics:
        base = cls()
        return cls(**{field: prefix + name for field, name in base.as_dict().items()})

    def as_dict(self) -> dict[str, str]:
        return {
            "generation_results": self.generation_results,
            "learning_events": self.learning_events,
            "adapter_updates": self.adapter_updates,
            "adapter_latest": self.adapter_latest,
            "dead_letters": self.dead_letters,
            "quarantine": self.quarantine,
        }

    def all(self) -> list[str]:
        return list(self.as_dict().values())
