"""Serve's frozen configuration; :func:`lorastream.stages.serve_config` builds it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorastream.serving.backends import BackendKind
from trainer.kafka import KafkaConnection
from trainer.signing import Verifier

__all__ = ["ServeConfig"]


@dataclass(frozen=True)
class ServeConfig:
    """What serve needs; built from the settings by the wiring, never from the environment."""

    kafka: KafkaConnection
    updates_topic: str
    group_id: str
    backend: BackendKind
    url: str
    keep: int = 2
    drain_seconds: float = 30.0
    max_regression: float = 0.02
    """Refuse a version whose eval loss exceeds the best live one's by more than this fraction."""
    max_general_regression: float | None = None
    """Refuse a version whose general-set loss exceeds the base model's by more than this
    fraction (None: off)."""
    adapters: frozenset[str] = frozenset()
    """Only these adapters (all when empty)."""
    max_lora_rank: int = 16
    served_base: str | None = None
    trainer_base: str | None = None
    poll_seconds: float = 5.0
    cache_dir: Path | None = None
    """Where versions announced on an object store (s3://…) are fetched to, checked, and
    loaded from (the server is given that local directory)."""
    backoff_start: float = 1.0
    backoff_max: float = 30.0
    name: str | None = None
    """``--name``: what this serve's group and lock are named after instead of the URL."""
    lock_dir: Path | None = None
    """Where the lock that keeps a second serve for this server off this machine lies
    (none: only the group's members are checked)."""
    session_timeout: float = 10.0
    """The follower's Kafka session timeout: how long a crashed serve's member stays in
    its group, and so how long a serve starting after it waits for it to leave."""
    unreachable_log_every: float = 60.0
    """While the server cannot be reached, how often serve says again that it retries."""
    verifier: Verifier = field(default_factory=Verifier)
    """What serve trusts: the announcement key, and the adapter location a version's files
    must lie under (LORASTREAM_ADAPTER_DIR or its bucket); anything else is skipped."""

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ValueError(f"keep must be at least 1, not {self.keep}")
        if self.drain_seconds < 0:
            raise ValueError(f"drain_seconds must be 0 or more, not {self.drain_seconds}")
        if not self.max_regression >= 0:
            raise ValueError(f"max_regression must be 0 or more, not {self.max_regression}")
        if self.max_general_regression is not None and not self.max_general_regression >= 0:
            raise ValueError(
                f"max_general_regression must be 0 or more, not {self.max_general_regression}"
            )

    @property
    def server(self) -> str:
        """The server as the clash message names it: its ``--name`` or its URL."""
        return f"the server named {self.name!r} ({self.url})" if self.name else self.url

    def in_scope(self, adapter: str) -> bool:
        """Whether serve follows ``adapter`` (``--adapter``; every adapter when none)."""
        return not self.adapters or adapter in self.adapters
