"""The root of lorastream's exceptions.

Every error that lorastream raises on purpose derives from :class:`LorastreamError`,
so a caller (the CLI first of all) can catch the project's own errors and
nothing else. Each package adds its own small tree beside its code::

    LorastreamError
    ├── schemas.SchemaError            a document that breaks the wire contract
    ├── streams.StreamsError           the scoring stage
    ├── KafkaUnavailableError          a Kafka client call failed: the servers and what was being done
    ├── trainer.TrainerError           the training stage
    │   ├── AdapterStoreError          a missing or corrupt adapter file
    │   ├── StepError                  a LoRA step that raised or gave a non-finite loss
    │   └── ReplayError                a replay that cannot run (unknown adapter, range gone …)
    └── lorastream.dev.errors.BrokerError  the local broker could not be assembled or started
"""

from __future__ import annotations

__all__ = ["KafkaPosition", "KafkaUnavailableError", "LorastreamError", "SchemaError"]


class KafkaPosition:
    """Where a record lies: topic, partition and offset, for error messages."""

    __slots__ = ("offset", "partition", "topic")

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"

    def __repr__(self) -> str:
        return f"KafkaPosition({self.topic!r}, {self.partition}, {self.offset})"


class LorastreamError(Exception):
    """Base of every error lorastream raises on purpose."""


class SchemaError(LorastreamError):
    """A document that breaks the wire contract.

    ``problems`` lists ``(field, message)`` pairs, the field as a dotted path
    (``"source.offset"``) or ``"$"`` for the document as a whole, so that a
    person can find and fix each one. ``position`` says where the document was
    read from when it came from Kafka; ``line`` when it came from a file.
    """

    def __init__(
        self,
        type_name: str,
        problems: list[tuple[str, str]],
        *,
        position: KafkaPosition | None = None,
        line: int | None = None,
    ) -> None:
        self.type_name = type_name
        self.problems = problems
        self.position = position
        self.line = line
        super().__init__(self.describe())

    def describe(self) -> str:
        where = ""
        if self.position is not None:
            where = f" at {self.position}"
        elif self.line is not None:
            where = f" on line {self.line}"
        return f"invalid {self.type_name}{where}: {self.details()}"

    def at_line_of(self, file: object) -> str:
        """``FILE:LINE: invalid Type: problems``, the form compilers and editors jump to."""
        return f"{file}:{self.line}: invalid {self.type_name}: {self.details()}"

    def details(self) -> str:
        """The problems alone, ``field: message; …``."""
        return "; ".join(f"{field}: {message}" for field, message in self.problems)


class KafkaUnavailableError(LorastreamError):
    """A call to Kafka failed: the cluster is unreachable, refused, or timed out.

    Raised by the one place that translates Kafka client errors
    (:func:`trainer.kafka.kafka_errors`); the message names the servers that
    were tried and what was being done, so that it stands alone on one line.
    """

    def __init__(self, servers: str, doing: str, reason: str) -> None:
        self.servers = servers
        self.doing = doing
        self.reason = reason
        super().__init__(
            f"{doing}: Kafka at {servers} failed: {reason}. Is the broker running "
            "(`lorastream broker status`) and KAFKA_BOOTSTRAP_SERVERS right?"
        )
