"""jsonbytes.loads reads every body exactly as json.loads does (value or error), UTF-16/32
and BOM-led bodies included: request bodies at admission and response bodies in the meter
go through it."""

from __future__ import annotations

import json

import pytest

from ai_saas_middleware import jsonbytes

BODIES = [
    b'{"model":"m","messages":[{"role":"user","content":"hi"}]}',
    '\ufeff{"a":1}'.encode(),  # UTF-8 with a BOM
    '{"a":"\u00e9"}'.encode("utf-16"), '{"a":1}'.encode("utf-16-le"),
    '{"a":1}'.encode("utf-16-be"), '{"a":1}'.encode("utf-32"),
    b'"\xed\xa0\x80"',  # an encoded surrogate: json.loads passes it through
    b'{"a":', b"\xff", b"  [1]", b"1", b"\x00", b"\x00\x00", b'{"a":"\\ud800"}', b"{}x",
]


def _result(load: object, raw: bytes) -> tuple[str, object]:
    try:
        return "value", load(raw)  # type: ignore[operator]
    except (ValueError, RecursionError) as exc:
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize("raw", BODIES)
def test_a_body_reads_as_json_loads_reads_it(raw: bytes) -> None:
    assert _result(jsonbytes.loads, raw) == _result(json.loads, raw)
