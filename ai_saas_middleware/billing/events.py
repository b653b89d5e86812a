"""Usage events as the ledger takes them: one stream entry in, one checked row out.

An entry that is not a well-formed usage event of this package raises :class:`Rejected`
with the reason; the worker keeps it in ``rejected_events`` (never dropped silently) and
acknowledges it, so one bad entry cannot stall a shard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..store.keys import is_valid_tenant_id

__all__ = ["Event", "Rejected", "parse_entry"]

_TS = re.compile(r"(\d{4}-(?:0[1-9]|1[0-2]))-([0-3]\d)T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?Z\Z")
_PLAIN_DECIMAL = re.compile(r"-?\d{1,20}(?:\.\d{1,12})?\Z")
_TOKENS_MAX = 10 ** 12
_MONEY_MAX = Decimal(9_000_000)  # USD per event: fits 64-bit picodollars
_MONEY_MAX_P = 9_000_000 * 10 ** 12
_SEP = "\x1f"


class Rejected(ValueError):
    """A stream entry that is not a valid usage event (the message says why)."""


@dataclass(slots=True)
class Event:
    """One usage event, checked, with money in picodollars."""

    request_id: str
    tenant_id: str
    tier: str
    model_id: str
    provider: str
    period: str
    day: str
    ts: str
    prompt_tokens: int
    completion_tokens: int
    usage_source: str
    cost_p: int
    saved_p: int
    outcome_p: int | None
    status: int
    latency_ms: int
    cache: str
    fallback_from: str
    endpoint: str
    truncated: bool
    client_disconnected: bool
    price_version: int
    stream_id: str
    revenue_p: int = 0
    pricing_version: int = 0


def _field(fields: dict[str, str], name: str, default: str | None = None) -> str:
    value = fields.get(name, default)
    if value is None:
        raise Rejected(f"no {name}")
    return value


def _count(fields: dict[str, str], name: str, maximum: int = _TOKENS_MAX,
           default: str | None = None) -> int:
    text = _field(fields, name, default)
    # isascii: str.isdigit() is true of '²' too, which int() refuses (a ValueError, not
    # a Rejected, that stopped the worker on that entry for good).
    if not (text.isascii() and text.isdigit()) or len(text) > 13 or int(text) > maximum:
        raise Rejected(f"{name} {text[:40]!r} is not a whole number from 0 to {maximum}")
    return int(text)


def _money(fields: dict[str, str], name: str, default: str | None = None,
           signed: bool = False) -> int:
    """A plain decimal string (at most 12 places) as whole picodollars, exactly: by its
    digits, with no decimal context (and ten times faster than ``Decimal``)."""
    text = _field(fields, name, default)
    if not _PLAIN_DECIMAL.match(text) or (text.startswith("-") and not signed):
        raise Rejected(f"{name} {text[:40]!r} is not a plain decimal with at most 12 places")
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    amount = int(whole) * 10 ** 12 + (int(frac.ljust(12, "0")) if frac else 0)
    if amount > _MONEY_MAX_P:
        raise Rejected(f"{name} {text[:40]!r} is over {_MONEY_MAX} per event")
    return -amount if negative else amount


def _text(fields: dict[str, str], name: str, limit: int, default: str = "") -> str:
    value = fields.get(name, default)
    if len(value) > limit:
        raise Rejected(f"{name} is longer than {limit} characters")
    return value


def _fields(raw: Any) -> dict[str, str]:
    """The entry's fields as text. The usual case (redis-py's flat list of bytes) is
    decoded in one piece: joined by a separator, decoded, split; a value that holds the
    separator itself makes the pieces miscount, and takes the slow way."""
    try:
        if isinstance(raw, list) and len(raw) % 2 == 0:
            try:
                parts = b"\x1f".join(raw).decode().split(_SEP)
            except TypeError:  # not all bytes
                parts = []
            if len(parts) == len(raw):
                return dict(zip(parts[::2], parts[1::2], strict=True))
        items = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2],
                                                                strict=False)
        return {(k.decode() if isinstance(k, bytes) else str(k)):
                (v.decode() if isinstance(v, bytes) else str(v)) for k, v in items}
    except UnicodeDecodeError:
        raise Rejected("a field is not UTF-8") from None


def parse_entry(stream_id: str, raw: Any) -> Event:
    """The :class:`Event` of one stream entry (``raw``: redis-py's field dict or flat list,
    bytes or str); raises :class:`Rejected` when it is not a valid usage event."""
    if isinstance(raw, list):
        event = _parse_usual(stream_id, raw)
        if event is not None:
            return event
    return _parse_checked(stream_id, raw)


# The worker's fast path. Every entry the middleware writes has settle.lua's fields in one
# order (settlement.py's, the spool's replay keeps it): for those, one regular expression
# over the decoded entry does all of _parse_checked's checks at once (more than twice as
# fast as the nineteen lookups and calls). It accepts only entries _parse_checked accepts,
# with the same result (tests/test_event_parsing.py compares the two); anything else --
# another order, an extra or missing field, a value out of a range or of ASCII digits, a
# separator inside a value -- does not match and takes the checked way, which accepts or
# rejects it with its reason. Numeric maxima are compared after the match.
_V = "[^\x1f]"  # any character of a value but the separator the entry is joined by
_N = "([0-9]{1,13})"  # a count: _count's digits (ASCII only), its maximum compared after
_USUAL = re.compile("\x1f".join(f"{name}\x1f{pattern}" for name, pattern in (
    ("request_id", "([ -~]{1,128})"),  # printable ASCII (other printable: checked way)
    ("tenant_id", "([A-Za-z0-9_.-]{1,64})"),  # is_valid_tenant_id's characters
    ("tier", f"({_V}{{0,64}})"),
    ("model_id", f"({_V}{{0,200}})"),
    ("provider", f"({_V}{{0,100}})"),
    ("prompt_tokens", _N),
    ("completion_tokens", _N),
    ("usage_source", f"({_V}{{0,16}})"),
    ("cost", "([0-9]{1,20})(?:\\.([0-9]{1,12}))?"),  # unsigned; _MONEY_MAX compared after
    ("latency_ms", _N),
    ("status", "([0-9]{1,3})"),  # 0 to 999
    ("cache", f"({_V}{{0,8}})"),
    ("fallback_from", f"({_V}{{0,200}})"),
    ("outcome_value", "((-?)([0-9]{1,20})(?:\\.([0-9]{1,12}))?)?"),  # empty: none
    ("ts", "((\\d{4}-(?:0[1-9]|1[0-2]))-([0-3]\\d)T\\d{2}:\\d{2}:\\d{2}"
           "(?:\\.\\d{1,9})?Z)"),
    ("endpoint", f"({_V}{{0,200}})"),
    ("client_disconnected", "(true|false)"),
    ("price_version", _N),
    ("truncated", "(true|false)"),
)), re.ASCII)
_PICO = 10 ** 12
_INT_MAX = 2 ** 31 - 1


def _picodollars(whole: str, frac: str | None) -> int:
    return int(whole) * _PICO + (int(frac.ljust(12, "0")) if frac else 0)


def _parse_usual(stream_id: str, raw: list[Any]) -> Event | None:
    """The event of an entry in the middleware's own layout, or None: not in that layout
    (or not all bytes, or not UTF-8): then only :func:`_parse_checked` can tell."""
    try:
        match = _USUAL.fullmatch(b"\x1f".join(raw).decode())
    except (TypeError, UnicodeDecodeError):
        return None
    if match is None:
        return None
    (request_id, tenant_id, tier, model_id, provider, prompt, completion, usage_source,
     cost_whole, cost_frac, latency, status, cache, fallback_from, outcome, negative,
     outcome_whole, outcome_frac, ts, period, day, endpoint, disconnected, price_version,
     truncated) = match.groups()
    prompt_tokens, completion_tokens = int(prompt), int(completion)
    latency_ms, price_v = int(latency), int(price_version)
    cost_p = _picodollars(cost_whole, cost_frac)
    outcome_abs = _picodollars(outcome_whole, outcome_frac) if outcome else 0
    if (prompt_tokens > _TOKENS_MAX or completion_tokens > _TOKENS_MAX
            or latency_ms > _INT_MAX or price_v > _INT_MAX
            or cost_p > _MONEY_MAX_P or outcome_abs > _MONEY_MAX_P):
        return None  # out of range: the checked way says which
    outcome_p = (-outcome_abs if negative else outcome_abs) if outcome else None
    # By position, in Event's field order (keywords cost 1 us an event more; the test
    # comparing this parse with the checked one would catch a field out of place).
    return Event(request_id, tenant_id, tier, model_id, provider, period,
                 f"{period}-{day}", ts, prompt_tokens, completion_tokens, usage_source,
                 cost_p, 0, outcome_p, int(status), latency_ms, cache, fallback_from,
                 endpoint, truncated == "true", disconnected == "true", price_v, stream_id)


def _parse_checked(stream_id: str, raw: Any) -> Event:
    """:func:`parse_entry` for any entry, field by field (each failure with its reason)."""
    fields = _fields(raw)
    request_id = _text(fields, "request_id", 128)
    if not request_id or not request_id.isprintable():
        raise Rejected("no printable request_id")
    tenant_id = _field(fields, "tenant_id")
    if not is_valid_tenant_id(tenant_id):
        raise Rejected(f"tenant_id {tenant_id[:80]!r} is not a valid tenant id")
    ts = _field(fields, "ts")
    match = _TS.match(ts)
    if match is None:
        raise Rejected(f"ts {ts[:40]!r} is not an ISO-8601 UTC time")
    period, day = match.group(1), f"{match.group(1)}-{match.group(2)}"
    outcome = fields.get("outcome_value", "")
    status = _count(fields, "status", 999)
    return Event(
        request_id=request_id,
        tenant_id=tenant_id,
        tier=_text(fields, "tier", 64),
        model_id=_text(fields, "model_id", 200),
        provider=_text(fields, "provider", 100),
        period=period,
        day=day,
        ts=ts,
        prompt_tokens=_count(fields, "prompt_tokens"),
        completion_tokens=_count(fields, "completion_tokens"),
        usage_source=_text(fields, "usage_source", 16, "handler"),
        cost_p=_money(fields, "cost"),
        saved_p=_money(fields, "saved_cost", "0"),
        outcome_p=_money(fields, "outcome_value", signed=True) if outcome else None,
        status=status,
        latency_ms=_count(fields, "latency_ms", 2 ** 31 - 1, "0"),
        cache=_text(fields, "cache", 8, "miss"),
        fallback_from=_text(fields, "fallback_from", 200),
        endpoint=_text(fields, "endpoint", 200),
        truncated=fields.get("truncated") == "true",
        client_disconnected=fields.get("client_disconnected") == "true",
        price_version=_count(fields, "price_version", 2 ** 31 - 1, "0"),
        stream_id=stream_id,
    )
