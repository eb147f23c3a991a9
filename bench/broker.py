"""The broker a benchmark runs against: KAFKA_BOOTSTRAP_SERVERS if set, else a local one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lorastream.dev.broker import LocalBroker
from lorastream.dev.ports import free_port
from lorastream.settings import default_home

__all__ = ["bench_bootstrap"]


@contextmanager
def bench_bootstrap(tmp: Path) -> Iterator[str]:
    """The bootstrap address; a local broker on free ports (stopped after) when none is set."""
    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if given:
        yield given
        return
    broker = LocalBroker(
        tmp / "kafka",
        port=free_port(),
        controller_port=free_port(),
        jars_dir=default_home() / "jars",
    )
    bootstrap = broker.start()
    try:
        yield bootstrap
    finally:
        broker.stop()
