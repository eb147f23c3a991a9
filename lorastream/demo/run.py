"""One demo run's state: what it started and made, so that clean-up undoes exactly that,
and the few ways it speaks to the person watching.

The steps (:mod:`lorastream.demo.steps`), what was learned
(:mod:`lorastream.demo.learned`) and the clean-up (:mod:`lorastream.demo.cleanup`) all
read and write this one object; none of them keeps state of its own.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from lorastream.settings import Settings
from schemas import AdapterUpdate
from schemas.errors import LorastreamError
from trainer.kafka import KafkaConnection

__all__ = ["DemoError", "Run"]


class DemoError(LorastreamError):
    """The demo could not run to the end."""


@dataclass
class Run:
    """One demo run: what it started and made, so that clean-up undoes exactly that."""

    settings: Settings
    console: Console
    timeout: float
    keep: bool
    failed: bool = False  # an error: the workers' logs are shown before they are removed
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)
    bootstrap: str = ""
    broker: Any = None  # the LocalBroker this run started, if any
    topics_made: bool = False
    work: Path | None = None  # the temporary directory, without --keep
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    updates: list[AdapterUpdate] = field(default_factory=list)
    first_version: float = 0.0  # seconds from the start to the first announcement

    def __post_init__(self) -> None:
        prefix = self.settings.topic_prefix or f"demo-{uuid.uuid4().hex[:6]}."
        self.prefix = prefix
        self.name = prefix.rstrip(".") or "demo"
        self.settings = self.settings.model_copy(update={"topic_prefix": prefix})
        self.topics = self.settings.topics
        self.results = self.settings.home / "demo" / self.name  # the picture; with --keep all
        if self.keep:
            self.logs = self.results
            self.adapters = (Path(self.settings.adapter_dir) / self.name).resolve()
        else:
            self.work = Path(tempfile.mkdtemp(prefix=f"lorastream-{self.name}-"))
            self.logs = self.work
            self.adapters = self.work / "adapters"
        self.logs.mkdir(parents=True, exist_ok=True)

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def plain(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def stage(self, number: int, title: str) -> None:
        self.console.rule(f"[bold]{number}. {title}", align="left")

    def clock(self) -> str:
        return f"{time.monotonic() - self.started:.1f}s"

    @property
    def kafka(self) -> KafkaConnection:
        """The run's broker (:attr:`bootstrap`, once :func:`prepare_kafka` set it) and the
        settings' security options."""
        return self.settings.kafka_connection()
