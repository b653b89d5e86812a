"""``ai-saas billing audit``: prove every usage event is in the spool, a stream or the ledger.

The durable path is one chain: a settlement that cannot reach Redis waits in the local
spool; settle.lua puts the event in its shard's stream *and* the request's real tokens on
the tenant's monthly quota counter, in one script; the worker moves the stream into the
ledger and acknowledges (and lets it be trimmed) only after the commit. The quota
counter is therefore an independent witness of every settlement that ran: per tenant and
month, at any instant,

    counter == tokens of the requests settled (in a stream or the ledger, once each)
               + tokens of settlements seen twice (a replay after the settled marker
                 expired: counted twice on the counter, once in the ledger)
               + tokens of events the worker rejected (kept in rejected_events)
               + tokens reserved by requests still in flight (the reservations)

A spooled settlement has not touched the counter yet (its reservation, if Redis holds
one, is still in flight), so the spool is shown beside the others but is not in the sum.
:func:`audit` reads one consistent instant per shard (``store/lua/audit.lua``: the
counters, the reservations and the stream's last id in one script), then the stream up to
that id, then the ledger (rows of later stream entries left out), then the spool: the
check holds under live traffic and a running worker. The legitimate differences (a
counter that expired, events of another month, ...) are in ``docs/billing.md``,
"Audit: the durable path".
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.exceptions import ResponseError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from ..admission import QUOTA_TTL_S, month_bounds
from ..config import Config
from ..errors import StoreError
from ..spool import REJECTED, Spool, event_of
from ..store.keys import KeySchema, is_valid_tenant_id
from ..store.redis import RedisStore, load_script
from ..tabulate import table
from . import tables as t
from .events import Rejected, parse_entry
from .ledger import Ledger, LedgerError

__all__ = ["Count", "TenantAudit", "audit", "cmd_audit"]

log = logging.getLogger("ai_saas_middleware.billing")

_PAGE = 1000  # stream entries per XRANGE
_ROUNDS = 5  # snapshots of a shard while new tenants keep appearing in its stream


@dataclass(frozen=True, slots=True)
class Count:
    """Some usage events of one tenant and month: how many, and their tokens."""

    events: int = 0
    tokens: int = 0

    def as_json(self) -> dict[str, int]:
        return {"events": self.events, "tokens": self.tokens}


def _count(tokens: Iterable[int]) -> Count:
    values = list(tokens)
    return Count(len(values), sum(values))


@dataclass(frozen=True, slots=True)
class TenantAudit:
    """One tenant's month, side by side (see the module docstring for the sum).

    ``counter``: tokens on the monthly quota counter (None: there is none). ``in_flight``:
    the reservations of that month still held. ``spool``: settlements waiting in the
    local spool that no stream or ledger holds yet (not on the counter yet); ``set_aside``:
    those the spool gave up on (``rejected.jsonl``). ``stream``: events in a stream and not
    yet in the ledger; ``ledger``: rows of ``usage_events``; ``settled``: the two
    together, once per request id; ``union``: spool, stream and ledger, once per request
    id. ``repeated``: stream entries of a request already settled under another entry.
    ``rejected``: entries the worker rejected (``rejected_events``) or would reject.
    ``expected``: what the counter should hold. ``status``: ``ok``, ``differs`` or
    ``no counter`` (expired: nothing to compare); ``notes`` explains what differs or is
    unusual.
    """

    tenant_id: str
    period: str
    counter: int | None
    in_flight: Count
    spool: Count
    set_aside: Count
    stream: Count
    ledger: Count
    settled: Count
    union: Count
    repeated: Count
    rejected: Count
    expected: int
    status: str
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True unless the counter and the events disagree."""
        return self.status != "differs"

    @property
    def difference(self) -> int | None:
        """Counter minus expected tokens (None without a counter)."""
        return None if self.counter is None else self.counter - self.expected

    def as_json(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id, "period": self.period, "counter": self.counter,
            "in_flight": self.in_flight.as_json(), "spool": self.spool.as_json(),
            "set_aside": self.set_aside.as_json(), "stream": self.stream.as_json(),
            "ledger": self.ledger.as_json(), "settled": self.settled.as_json(),
            "union": self.union.as_json(), "repeated": self.repeated.as_json(),
            "rejected": self.rejected.as_json(), "expected": self.expected,
            "difference": self.difference, "status": self.status, "notes": list(self.notes),
        }


# ------------------------------------------------------------------ reading


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class _Seen:
    """One request's settlement: tokens, month, and where it was seen."""

    tenant_id: str
    month: str
    tokens: int
    entry: str  # stream entry id ('' when unknown)


@dataclass
class _Shard:
    """What was read of one shard: its snapshot and its stream up to it."""

    index: int
    stream: str
    tenants: set[str] = field(default_factory=set)
    last_id: str = "0-0"
    read_to: str = "-"  # the stream has been read up to (and with) this id
    counters: dict[str, int | str | None] = field(default_factory=dict)
    members: dict[str, list[str]] = field(default_factory=dict)
    entries: list[tuple[str, dict[str, str]]] = field(default_factory=list)


def _lenient(fields: dict[str, str]) -> tuple[str, str, int] | None:
    """(tenant, month, tokens) of an entry that is not a valid event, when it names them."""
    tenant = fields.get("tenant_id", "")
    ts = fields.get("ts", "")
    if not is_valid_tenant_id(tenant) or len(ts) < 7:
        return None
    tokens = 0
    for name in ("prompt_tokens", "completion_tokens"):
        value = fields.get(name, "0")
        tokens += int(value) if value.isascii() and value.isdigit() else 0
    return tenant, ts[:7], tokens


class _Reader:
    """Reads one deployment's Redis for one month (see the module docstring)."""

    def __init__(self, config: Config, store: RedisStore, period: str):
        self.config = config
        self.store = store
        self.period = period
        self.keys = KeySchema(config.redis.key_prefix, config.redis.shards)
        self._script = store.client.register_script(load_script("audit"))

    def call(self, *command: Any) -> Any:
        return self.store.call(*command)

    def stored_tenants(self) -> set[str]:
        found: set[str] = set()
        for shard in range(self.keys.shards):
            found |= {_text(x) for x in self.call("SMEMBERS", self.keys.tenant_index(shard))}
        return found

    def counter_tenants(self) -> set[str]:
        """Tenants with a counter of the month (SCAN: an admin path, never a request's)."""
        pattern = f"{_glob_escape(self.keys.prefix)}:{{s*}}:t:*:q:{self.period}"
        found = set()
        try:
            for key in self.store.client.scan_iter(match=pattern, count=1000):
                tenant = _text(key).split(":t:", 1)[1].rsplit(":q:", 1)[0]
                if is_valid_tenant_id(tenant):
                    found.add(tenant)
        except Exception as exc:  # redis-py's errors: translated like the store's
            raise self.store.health.failed(exc) from exc
        return found

    def snapshot(self, shard: _Shard) -> None:
        tenants = sorted(shard.tenants)
        keys = [shard.stream]
        for tenant in tenants:
            tk = self.keys.tenant(tenant)
            keys += [tk.quota(self.period), tk.reservations]
        self.store.health.check()
        try:
            reply = self._script(keys=keys, args=[])
        except Exception as exc:
            if isinstance(exc, ResponseError):
                raise self.store.health.refused(exc, "audit.lua") from exc
            raise self.store.health.failed(exc) from exc
        self.store.health.ok()
        shard.last_id = _text(reply[0])
        for i, tenant in enumerate(tenants):
            raw = reply[1 + 2 * i]
            if raw is None:
                shard.counters[tenant] = None
            else:
                text = _text(raw)
                shard.counters[tenant] = int(text) if text.lstrip("-").isdigit() else text
            shard.members[tenant] = [_text(m) for m in reply[2 + 2 * i]]

    def read_stream(self, shard: _Shard) -> set[str]:
        """Read the stream from where it was left up to the snapshot; the tenants seen."""
        seen: set[str] = set()
        if _entry_id(shard.last_id) == (0, 0):
            return seen
        start = shard.read_to
        while True:
            page = self.call("XRANGE", shard.stream, start if start == "-" else f"({start}",
                             shard.last_id, "COUNT", _PAGE)
            for raw_id, raw_fields in page:
                entry_id = _text(raw_id)
                fields = ({_text(k): _text(v) for k, v in raw_fields.items()}
                          if isinstance(raw_fields, dict) else
                          {_text(k): _text(v) for k, v in zip(raw_fields[::2],
                                                              raw_fields[1::2], strict=False)})
                shard.entries.append((entry_id, fields))
                tenant = fields.get("tenant_id", "")
                if is_valid_tenant_id(tenant):
                    seen.add(tenant)
                start = entry_id
            shard.read_to = start
            if len(page) < _PAGE:
                return seen


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _spooled(directory: Path) -> tuple[list[Any], list[Any]]:
    """The spool's pending calls (files waiting and files being replayed) and its
    set-aside calls, read only (nothing claimed, nothing created)."""
    if not directory.is_dir():
        return [], []
    pending: list[Any] = []
    for path in sorted([*directory.glob("spool-*.jsonl"), *directory.glob("*.replaying")]):
        pending += Spool.entries(path)
    aside: list[Any] = []
    for path in [directory / REJECTED, *sorted(directory.glob("rejected-*.retrying"))]:
        aside += [r.get("call") for r in Spool.entries(path) if isinstance(r, dict)]
    return pending, aside


def _spool_event(entry: Any) -> tuple[dict[str, str], list[Any]] | None:
    """(event fields, settle.lua's ARGV) of a spooled settle call, or None."""
    try:
        args = list(entry[2])
        event = event_of([str(a) for a in args])
    except (TypeError, IndexError, KeyError):
        return None
    if event is None or not is_valid_tenant_id(event.get("tenant_id", "")):
        return None
    return event, args


def _event_tokens(event: dict[str, str]) -> int:
    total = 0
    for name in ("prompt_tokens", "completion_tokens"):
        value = event.get(name, "0")
        total += int(value) if value.isascii() and value.isdigit() else 0
    return total


# ------------------------------------------------------------------ the audit


def audit(config: Config, store: RedisStore, ledger: Ledger, period: str, *,
          spool_dir: str | Path | None = None) -> list[TenantAudit]:
    """Audit the month ``period`` ('YYYY-MM') of every tenant: from the configuration,
    stored in Redis, with a quota counter of that month, or named by a stream or the
    ledger. ``spool_dir``: the spool to read (default: ``redis.spoolDir``, else the
    deployment's default); only this machine's spool can be read.

    Returns one :class:`TenantAudit` per tenant, sorted by tenant id.

    Raises:
        StoreError: Redis is unreachable or refused a read.
        sqlalchemy.exc.SQLAlchemyError: the ledger cannot be read.
    """
    reader = _Reader(config, store, period)
    keys = reader.keys
    # Tenants first: every source that can name one.
    with ledger.reading() as conn:
        ledger_tenants = {r[0] for r in conn.execute(
            select(t.usage_events.c.tenant_id).where(t.usage_events.c.period == period)
            .distinct())}
    tenants = ({*config.tenants} | reader.stored_tenants() | reader.counter_tenants()
               | ledger_tenants)
    shards = [_Shard(s, keys.stream(s)) for s in range(keys.shards)]
    for tenant in tenants:
        if is_valid_tenant_id(tenant):
            shards[keys.shard_of(tenant)].tenants.add(tenant)
    # Per shard: snapshot, then the stream up to it; a tenant first met in the stream
    # gets its counter in a new snapshot (the stream then read on to the new one).
    for shard in shards:
        for _ in range(_ROUNDS):
            reader.snapshot(shard)
            # (A tenant of another shard in this stream is no settle.lua event: left out.)
            new = {tn for tn in reader.read_stream(shard)
                   if keys.shard_of(tn) == shard.index} - shard.tenants
            if not new:
                break
            shard.tenants |= new
        else:
            raise StoreError(f"the audit of {shard.stream} did not settle: new tenants kept "
                             "appearing in its stream")

    # The ledger, after every stream: an entry trimmed since it was read is in it.
    snapshot_of = {s.stream: _entry_id(s.last_id) for s in shards}

    def _after_snapshot(stream_id: str, tenant: str) -> str | None:
        """The entry id of a ledger row's ``stream_id`` ('<stream key> <entry id>'), or
        None when that entry was added after the snapshot (so the counter read does not
        hold it either)."""
        stream, _, entry = stream_id.rpartition(" ")
        if not stream and is_valid_tenant_id(tenant):
            stream = keys.stream(keys.shard_of(tenant))
        limit = snapshot_of.get(stream)
        try:
            if limit is not None and _entry_id(entry) > limit:
                return None
        except ValueError:
            pass
        return entry
    in_ledger: dict[str, _Seen] = {}
    with ledger.reading() as conn:
        e = t.usage_events.c
        rows = conn.execute(select(e.request_id, e.tenant_id, e.prompt_tokens,
                                   e.completion_tokens, e.stream_id)
                            .where(e.period == period))
        for request_id, tenant, prompt, completion, stream_id in rows:
            entry = _after_snapshot(str(stream_id), tenant)
            if entry is not None:
                in_ledger[request_id] = _Seen(tenant, period, int(prompt) + int(completion),
                                              entry)
        rejected_rows = list(conn.execute(select(t.rejected_events.c.stream_id,
                                                 t.rejected_events.c.raw)))

    settled: dict[str, _Seen] = dict(in_ledger)
    stream_only: dict[str, _Seen] = {}
    repeated: dict[str, list[int]] = {}
    rejected: dict[str, dict[str, int]] = {}  # tenant -> stream id -> tokens
    for shard in shards:
        for entry_id, fields in shard.entries:
            try:
                event = parse_entry(f"{shard.stream} {entry_id}", fields)
            except Rejected:
                named = _lenient(fields)
                if named is not None and named[1] == period:
                    rejected.setdefault(named[0], {})[entry_id] = named[2]
                continue
            if event.period != period:
                continue
            tokens = event.prompt_tokens + event.completion_tokens
            known = settled.get(event.request_id)
            if known is None:
                seen = _Seen(event.tenant_id, period, tokens, entry_id)
                settled[event.request_id] = stream_only[event.request_id] = seen
            elif known.entry != entry_id:
                # A second settlement of the request (see the module docstring).
                repeated.setdefault(event.tenant_id, []).append(tokens)
    for stream_id, raw in rejected_rows:
        named = _raw_fields(raw)
        if named is None or named[1] != period:
            continue
        entry = _after_snapshot(str(stream_id), named[0])
        if entry is not None:  # (one entry in the stream and the table counts once)
            rejected.setdefault(named[0], {})[entry] = named[2]

    # The spool last: what it holds has not reached the counter.
    directory = Path(spool_dir or config.redis.spool_dir
                     or Spool.default_dir(config.redis.key_prefix))
    pending, aside = _spooled(directory)
    spool_only: dict[str, list[tuple[str, int, str]]] = {}  # tenant -> (request, tokens,
    spool_ids: dict[str, set[str]] = {}                     # reservation member)
    replay_twice: dict[str, int] = {}
    already: list[tuple[str, str]] = []  # (tenant, settled-marker key) of settled ones
    for entry in pending:
        parsed = _spool_event(entry)
        if parsed is None or parsed[0].get("ts", "")[:7] != period:
            continue
        spooled, args = parsed
        tenant, request_id = spooled["tenant_id"], spooled.get("request_id", "")
        spool_ids.setdefault(tenant, set()).add(request_id)
        if request_id in settled:
            already.append((tenant, keys.tenant(tenant).settled(request_id)))
        else:
            member = str(args[3]) if len(args) > 3 else ""
            spool_only.setdefault(tenant, []).append((request_id, _event_tokens(spooled),
                                                      member))
    for tenant, marker in already:
        if not reader.call("EXISTS", marker):
            replay_twice[tenant] = replay_twice.get(tenant, 0) + 1
    set_aside: dict[str, list[int]] = {}
    for entry in aside:
        parsed = _spool_event(entry)
        if parsed is not None and parsed[0].get("ts", "")[:7] == period:
            set_aside.setdefault(parsed[0]["tenant_id"], []).append(_event_tokens(parsed[0]))

    everyone = (tenants | {s.tenant_id for s in settled.values()} | set(rejected)
                | set(spool_ids) | set(set_aside))
    counters: dict[str, int | str | None] = {}
    members: dict[str, list[str]] = {}
    for shard in shards:
        counters.update(shard.counters)
        members.update(shard.members)
    expired = time.time() >= _month_start(period) + QUOTA_TTL_S
    # (settled is in_ledger and stream_only, which share no request id)
    by_ledger: dict[str, list[int]] = {}
    for seen in in_ledger.values():
        by_ledger.setdefault(seen.tenant_id, []).append(seen.tokens)
    by_stream: dict[str, list[int]] = {}
    for seen in stream_only.values():
        by_stream.setdefault(seen.tenant_id, []).append(seen.tokens)
    results = []
    for tenant in sorted(tn for tn in everyone if is_valid_tenant_id(tn)):
        held = {}
        for member in members.get(tenant, []):
            parts = member.split(" ")
            if len(parts) >= 3 and parts[2] == period and parts[1].isdigit():
                held[member] = int(parts[1])
        ledger_count = _count(by_ledger.get(tenant, []))
        stream_count = _count(by_stream.get(tenant, []))
        settled_count = Count(ledger_count.events + stream_count.events,
                              ledger_count.tokens + stream_count.tokens)
        waiting = spool_only.get(tenant, [])
        spool_count = _count(tokens for _, tokens, _ in waiting)
        in_spool_all = len(spool_ids.get(tenant, ()))
        union = Count(settled_count.events + spool_count.events,
                      settled_count.tokens + spool_count.tokens)
        again = _count(repeated.get(tenant, []))
        refused = _count(rejected.get(tenant, {}).values())
        in_flight = _count(held.values())
        expected = settled_count.tokens + again.tokens + refused.tokens + in_flight.tokens
        raw_counter = counters.get(tenant)
        notes: list[str] = []
        counter: int | None
        if isinstance(raw_counter, str):
            counter = None
            status = "differs"
            notes.append(f"the quota counter is not a number ({raw_counter[:80]})")
        else:
            counter = raw_counter
            if counter is None and expected and expired:
                status = "no counter"
                notes.append(f"no quota counter: it expired ({QUOTA_TTL_S // 86400} days "
                             "after the month's first request); nothing to compare")
            elif (counter or 0) == expected:
                status = "ok"
            else:
                status = "differs"
                diff = (counter or 0) - expected
                notes.append(f"the counter holds {abs(diff)} tokens "
                             f"{'more' if diff > 0 else 'fewer'} than the settled events "
                             "and reservations: "
                             + ("settlements whose events are in no stream and not in the "
                                "ledger (lost), or counted twice" if diff > 0 else
                                "events in the ledger or a stream that the counter never "
                                "counted"))
        if again.events:
            notes.append(f"{again.events} requests settled twice (a replay after the "
                         "settled marker expired): the quota counted them twice, the "
                         "ledger once")
        if refused.events:
            notes.append(f"{refused.events} events rejected by the worker (rejected_events): "
                         "on the counter, not billed")
        if waiting:
            with_reservation = sum(1 for _, _, member in waiting if member in held)
            notes.append(f"{len(waiting)} settlements wait in the spool ({directory}): not "
                         f"on the counter until replayed ({with_reservation} still hold "
                         "their reservation)")
        if in_spool_all > len(waiting):
            notes.append(f"{in_spool_all - len(waiting)} spooled settlements already "
                         "settled: their replay changes nothing"
                         + (f", except {replay_twice[tenant]} whose settled marker expired "
                            "(the replay will count them on the quota again)"
                            if replay_twice.get(tenant) else ""))
        if tenant in set_aside:
            notes.append(f"{len(set_aside[tenant])} settlements set aside by the spool "
                         "(ai-saas spool status): neither counted nor billed")
        results.append(TenantAudit(
            tenant_id=tenant, period=period, counter=counter, in_flight=in_flight,
            spool=spool_count, set_aside=_count(set_aside.get(tenant, [])),
            stream=stream_count, ledger=ledger_count, settled=settled_count, union=union,
            repeated=again, rejected=refused, expected=expected, status=status,
            notes=tuple(notes)))
    return results


def _month_start(period: str) -> int:
    year, month = map(int, period.split("-"))
    return month_bounds(year, month)[1]


def _raw_fields(raw: Any) -> tuple[str, str, int] | None:
    """(tenant, month, tokens) of a ``rejected_events.raw`` (a JSON object of the entry's
    fields, or a flat JSON list of them), when it names them."""
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if isinstance(value, list):
        value = dict(zip(value[::2], value[1::2], strict=False))
    if not isinstance(value, dict):
        return None
    return _lenient({str(k): str(v) for k, v in value.items()})


# ------------------------------------------------------------------ the command


_COLUMNS = ("tenant", "counter", "in flight", "spool", "stream", "ledger", "rejected",
            "twice", "expected", "diff", "status")


def _cell(count: Count) -> str:
    return f"{count.tokens}/{count.events}" if count.events else "-"


def render_table(results: list[TenantAudit]) -> str:
    """The audit as a table: tokens/events per column, then each tenant's notes."""
    rows = [list(_COLUMNS)]
    for r in results:
        rows.append([r.tenant_id, "-" if r.counter is None else str(r.counter),
                     _cell(r.in_flight), _cell(r.spool), _cell(r.stream), _cell(r.ledger),
                     _cell(r.rejected), _cell(r.repeated), str(r.expected),
                     "-" if r.difference is None else f"{r.difference:+d}", r.status])
    lines = [table(rows, right=range(1, len(_COLUMNS)))]
    for r in results:
        lines += [f"{r.tenant_id}: {note}" for note in r.notes]
    return "\n".join(lines)


def cmd_audit(args: argparse.Namespace) -> int:
    """``ai-saas billing audit --period YYYY-MM``: 0 when every tenant adds up, 1 when
    some do not (listed on stderr)."""
    import os
    import sys

    from ..config import load_config

    config = load_config(args.config)
    ledger = Ledger(args.database or config.billing.database)
    store = RedisStore(config.redis, args.redis_url or config.redis.url
                       or os.environ.get("REDIS_URL"))
    try:
        ledger.check_version()
        results = audit(config, store, ledger, args.period)
    except SQLAlchemyError as exc:  # the ledger's driver errors: a message, no traceback
        raise LedgerError(f"the ledger {ledger.url} cannot be read: "
                          f"{getattr(exc, 'orig', None) or exc}") from None
    finally:
        store.close()
        ledger.close()
    if args.format == "json":
        print(json.dumps([r.as_json() for r in results], indent=2))
    else:
        print(f"audit of {args.period}: tokens/events per tenant; expected = settled "
              "(stream + ledger) + settled twice + rejected + in flight; the spool is not "
              "on the counter until replayed")
        print(render_table(results))
    differing = [r for r in results if not r.ok]
    if differing:
        some = "1 tenant does" if len(differing) == 1 else f"{len(differing)} tenants do"
        print(f"ai-saas: {some} not add up for {args.period}: "
              + ", ".join(f"{r.tenant_id} ({r.difference:+d} tokens)"
                          if r.difference is not None else r.tenant_id for r in differing),
              file=sys.stderr)
        return 1
    if args.format == "table":
        print(f"every tenant adds up for {args.period}.")
    return 0
