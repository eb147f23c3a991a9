"""``LORASTREAM_LOG_FORMAT=json``: one JSON object per record, the Kafka position when given."""

from __future__ import annotations

import io
import json
import logging

import pytest

from lorastream.logformat import JsonFormatter
from lorastream.settings import load_settings


def _logged(emit: object) -> list[dict[str, object]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.logformat")
    logger.handlers, logger.propagate, logger.level = [handler], False, logging.DEBUG
    emit(logger)  # type: ignore[operator]
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_record_is_one_json_line_with_time_level_logger_message() -> None:
    (record,) = _logged(lambda log: log.info("tutor v%d: loss %.2f\nsecond line", 3, 0.5))
    assert record["level"] == "INFO"
    assert record["logger"] == "test.logformat"
    assert record["message"] == "tutor v3: loss 0.50\nsecond line"
    assert str(record["time"]).endswith("+00:00")
    assert "topic" not in record and "offset" not in record


def test_the_kafka_position_given_as_extra_is_kept() -> None:
    (record,) = _logged(
        lambda log: log.error(
            "quarantined", extra={"topic": "learning-events", "partition": 2, "offset": 41}
        )
    )
    assert (record["topic"], record["partition"], record["offset"]) == ("learning-events", 2, 41)
    assert record["level"] == "ERROR"


def test_an_exception_is_in_the_same_line() -> None:
    def emit(log: logging.Logger) -> None:
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")

    (record,) = _logged(emit)
    assert "ValueError: boom" in str(record["exception"])


def test_the_setting_takes_text_or_json_only() -> None:
    from lorastream.settings import SettingsError

    assert load_settings().log_format in ("text", "json")
    assert load_settings(log_format="json").log_format == "json"
    with pytest.raises(SettingsError, match="LORASTREAM_LOG_FORMAT"):
        load_settings(log_format="xml")
