"""``LORASTREAM_LOG_FORMAT=json``: one JSON object per log record, per line.

For log shippers (Loki, Elasticsearch, CloudWatch): each line is
``{"time", "level", "logger", "message"}``, plus ``topic``, ``partition``
and ``offset`` when the record was logged with them as ``extra`` (the
trainer does for every window and record it names), plus ``exception``
with the traceback when there is one.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import orjson

__all__ = ["POSITION_FIELDS", "JsonFormatter"]

POSITION_FIELDS = ("topic", "partition", "offset")


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON; never raises for a record's content."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in POSITION_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                document[name] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(document, default=str).decode()
