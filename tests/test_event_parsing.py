"""The worker's fast parse of usage events gives what the field-by-field parse gives.

``events.parse_entry`` takes entries in the middleware's own layout through one regular
expression (``_parse_usual``) and everything else through ``_parse_checked``. These tests
put each field of a real entry through values at and past every check's edge and compare
the two ways: the fast one must accept only what the checked one accepts, with an equal
event, and parse_entry must answer as the checked way does (the same event, or the same
rejection and reason).
"""

from __future__ import annotations

import pytest
from billing_events import event_fields

from ai_saas_middleware.billing.events import Rejected, _parse_checked, _parse_usual, parse_entry

EDGES = [
    "", "0", "1", "007", "12", "-1", "-0", "1.5", "1.", ".5", "1e5", "0x10", " 1", "1 ",
    "\u0663", "\u00b2", "0.000000000001", "0.0000000000001", "-0.5", "12.345678901234",
    "9000000", "9000000.000000000001", "8999999.999999999999", "9000001",
    "00000000000000000001", "000000000000000000001",
    "999", "1000", "2147483647", "2147483648", "1000000000000", "1000000000001",
    "9999999999999", "10000000000000",
    "true", "false", "True", "yes",
    "x" * 8, "x" * 9, "x" * 16, "x" * 17, "x" * 64, "x" * 65, "x" * 100, "x" * 101,
    "x" * 128, "x" * 129, "x" * 200, "x" * 201, "é" * 64, "é" * 65, "a b", "a\tb", "a\nb",
    "a\x1fb", "\x1f", "tenant-001", "tenant 001", "t" * 64, "t" * 65,
    "2026-11-01T12:00:00Z", "2026-11-01T12:00:00.000Z", "2026-11-01T12:00:00.1234567890Z",
    "2026-13-01T12:00:00Z", "2026-00-01T12:00:00Z", "2026-11-41T12:00:00Z",
    "2026-11-01 12:00:00Z", "2026-11-01T12:00:00+00:00", "\u0662026-11-01T12:00:00Z",
]


def base_entry() -> list[bytes]:
    return [f.encode() for f in event_fields(7, "tenant-007", "run")[4]]


def outcome(raw: list[bytes]) -> object:
    try:
        return _parse_checked("s 1-0", raw)
    except Rejected as exc:
        return ("rejected", str(exc))


def assert_same(raw: list[bytes]) -> None:
    checked = outcome(raw)
    fast = _parse_usual("s 1-0", raw)
    if fast is not None:
        assert fast == checked, raw
    try:
        got: object = parse_entry("s 1-0", raw)
    except Rejected as exc:
        got = ("rejected", str(exc))
    assert got == checked, raw


def test_the_middlewares_own_entries_take_the_fast_way() -> None:
    for i in range(200):
        raw = [f.encode() for f in event_fields(i, f"tenant-{i % 7:03d}", "run")[4]]
        fast = _parse_usual("s 1-0", raw)
        assert fast is not None
        assert fast == _parse_checked("s 1-0", raw)


@pytest.mark.parametrize("name", [n.decode() for n in base_entry()[::2]])
def test_each_field_at_its_edges_parses_as_the_checked_way(name: str) -> None:
    entry = base_entry()
    at = entry[::2].index(name.encode()) * 2 + 1
    for value in [*(v.encode() for v in EDGES), b"\xff", b"caf\xc3"]:
        raw = list(entry)
        raw[at] = value
        assert_same(raw)


def test_other_layouts_parse_as_the_checked_way() -> None:
    entry = base_entry()
    pairs = list(zip(entry[::2], entry[1::2], strict=True))
    flat = [x for pair in reversed(pairs) for x in pair]  # another order
    assert_same(flat)
    assert_same([*entry, b"saved_cost", b"0.5"])  # an extra field
    assert_same([*entry, b"tier", b"free"])  # a field twice: the last one counts
    for k in range(len(pairs)):  # each field missing
        assert_same([x for j, pair in enumerate(pairs) if j != k for x in pair])
    assert_same([x.decode() for x in entry])  # str, not bytes
