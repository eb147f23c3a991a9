"""The codec's messages for JSON that other writers produce but JSON does not allow."""

from __future__ import annotations

import pytest

from schemas import GenerationResult, SchemaError, decode


@pytest.mark.parametrize(
    ("raw", "literal", "where"),
    [
        pytest.param(b'{"id": "a", "entropy_delta": NaN}', "NaN", "line 1 column 30", id="NaN"),
        pytest.param(b'{"x": Infinity}', "Infinity", "line 1 column 7", id="Infinity"),
        # orjson points past the sign; the column stays orjson's.
        pytest.param(b'{"x": -Infinity}', "-Infinity", "line 1 column 8", id="-Infinity"),
        pytest.param(b'{"x": nan}', "nan", "line 1 column 7", id="nan"),
        pytest.param(b'{"x": -inf}', "-inf", "line 1 column 8", id="-inf"),
        pytest.param('{"é": 1,\n "x": NaN}'.encode(), "NaN", "line 2 column 7", id="2nd-line"),
    ],
)
def test_nan_and_infinity_are_named_as_not_json_at_their_position(
    raw: bytes, literal: str, where: str
) -> None:
    with pytest.raises(SchemaError) as info:
        decode(raw, GenerationResult, line=3)
    message = str(info.value)
    assert message.startswith(
        f"invalid GenerationResult on line 3: $: not valid JSON: {literal} is not allowed in JSON"
    ), message
    assert f": {where} (char " in message, message
    assert "unexpected character" not in message


@pytest.mark.parametrize(
    ("raw", "orjson_says"),
    [
        pytest.param(b'{"x": NaNa}', "unexpected character", id="a-word-starting-NaN"),
        pytest.param(b'{"x": null, "y": nul}', "invalid literal", id="not-a-nan"),
        pytest.param(b'{"x": 1e999}', "number is infinity", id="overflow"),
    ],
)
def test_other_json_errors_keep_orjsons_message(raw: bytes, orjson_says: str) -> None:
    with pytest.raises(SchemaError) as info:
        decode(raw, GenerationResult)
    assert orjson_says in str(info.value)
    assert "is not allowed in JSON" not in str(info.value)
