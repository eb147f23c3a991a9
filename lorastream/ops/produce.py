"""``lorastream produce FILE.jsonl``: validate every line, then produce the good ones.

The file is read twice: once to validate every line (each bad line is
reported by number, with the field and the problem), once to produce, so a
file of any size runs in constant memory. Lines are produced as written,
keyed by their adapter name, with an idempotent producer and ``acks=all``;
the command returns only after the broker has acknowledged every record.

``-`` is standard input: it is copied to a temporary file first
(:func:`stdin_copy`), since a pipe cannot be read twice, and its lines are
named ``<stdin>:N`` in the reports.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from schemas import GenerationResult, SchemaError, decode
from schemas.errors import LorastreamError
from trainer.kafka import KafkaConnection, refusal

__all__ = [
    "STDIN_NAME",
    "ProduceError",
    "ValidationReport",
    "iter_lines",
    "produce_file",
    "stdin_copy",
    "validate_file",
]

# How reports name the lines of standard input, as compilers do: `<stdin>:3: ...`.
STDIN_NAME = "<stdin>"


class ProduceError(LorastreamError):
    """The file could not be read or its records could not be produced."""


@dataclass
class ValidationReport:
    good: int = 0
    blank: int = 0
    bad: list[SchemaError] = field(default_factory=list)


def iter_lines(path: Path, name: str | None = None) -> Iterator[tuple[int, bytes]]:
    """``(line number, line without its end-of-line)``, numbered from 1; ``name`` is what
    an error calls the input, else ``path``."""
    try:
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                yield number, line.rstrip(b"\r\n")
    except OSError as exc:
        raise ProduceError(f"cannot read {name or path}: {exc.strerror}") from exc


@contextmanager
def stdin_copy(stream: BinaryIO) -> Iterator[Path]:
    """``stream`` copied to a temporary file, deleted on exit: the file is validated, then
    produced, so it is read twice, which a pipe cannot be; on disk, so that input of any
    size runs in constant memory as a file does."""
    with tempfile.TemporaryDirectory(prefix="lorastream-stdin-") as directory:
        copy = Path(directory) / "stdin.jsonl"
        try:
            with copy.open("wb") as handle:
                shutil.copyfileobj(stream, handle)
        except OSError as exc:
            raise ProduceError(f"cannot copy standard input to {copy}: {exc.strerror}") from exc
        yield copy


def _parse(number: int, line: bytes) -> GenerationResult | None:
    if not line.strip():
        return None
    return decode(line, GenerationResult, line=number)


def validate_file(path: Path, name: str | None = None) -> ValidationReport:
    report = ValidationReport()
    for number, line in iter_lines(path, name):
        try:
            result = _parse(number, line)
        except SchemaError as exc:
            report.bad.append(exc)
            continue
        if result is None:
            report.blank += 1
        else:
            report.good += 1
    return report


async def produce_file(
    path: Path,
    kafka: KafkaConnection,
    topic: str,
    on_sent: Callable[[int], None] | None = None,
    name: str | None = None,
) -> int:
    """Produce the valid lines of ``path`` to ``topic``; return how many were acknowledged.
    ``name`` is what errors call the input (``<stdin>`` for a copy of it), else ``path``."""
    source = name or str(path)
    producer = AIOKafkaProducer(
        acks="all", enable_idempotence=True, linger_ms=5, **kafka.client_kwargs()
    )
    sent = 0
    try:
        await producer.start()
        pending = []
        for number, line in iter_lines(path, name):
            try:
                result = _parse(number, line)
            except SchemaError:
                continue
            if result is None:
                continue
            pending.append(await producer.send(topic, key=result.adapter.encode(), value=line))
            if len(pending) >= 1000:
                for future in pending:
                    await future
                sent += len(pending)
                if on_sent:
                    on_sent(len(pending))
                pending.clear()
        for future in pending:
            await future
        sent += len(pending)
        if on_sent:
            on_sent(len(pending))
    except KafkaError as exc:
        refused = await refusal(kafka, f"producing {source} to {topic}")
        if refused is not None:  # a secured cluster said no: say why, not "Unable to bootstrap"
            raise refused from exc
        raise ProduceError(
            f"producing {source} to {topic} on {kafka.servers} failed after {sent} records "
            f"were acknowledged: {exc!r}"
        ) from exc
    finally:
        await producer.stop()
    return sent
