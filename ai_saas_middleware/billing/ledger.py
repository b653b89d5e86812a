"""The billing ledger: usage events into SQL, exactly once, with their aggregates.

:class:`Ledger` wraps one SQLAlchemy engine (``billing.database``: SQLite by default,
PostgreSQL for production) and does what the worker, the reports and the Stripe
delivery need of it:

- :meth:`Ledger.record` prices a batch of events and inserts it in **one transaction**:
  one row per ``request_id`` (``INSERT ... ON CONFLICT DO NOTHING``: a replay, a
  redelivery or a second worker never inserts a row twice, however late), the
  ``usage_daily`` aggregates of exactly the rows inserted, and the margin flags; the
  caller acknowledges the stream entries only after it returns.
- :meth:`Ledger.writing` is a write transaction: on SQLite ``BEGIN IMMEDIATE`` (several
  workers on one file take turns instead of failing on a lock upgrade), on PostgreSQL
  with the service scope set for row-level security.
- :meth:`Ledger.tenant_scope` is a read transaction on one tenant's behalf: on
  PostgreSQL, under the RLS policy (:mod:`.migrations`), no query run in it can see or
  change another tenant's rows, whatever its ``WHERE`` says.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from ..errors import AISaaSError
from . import tables as t
from .clock import now_iso
from .events import Event
from .migrations import LATEST, STEPS
from .rates import Plan, Pricing

__all__ = ["Ledger", "LedgerError", "Prepared", "Recorded", "now_iso"]

log = logging.getLogger("ai_saas_middleware.billing")

_SUMMED = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_p", "revenue_p",
           "cache_hits", "saved_p", "outcome_p", "outcomes")


class LedgerError(AISaaSError):
    """The ledger cannot be opened or used as configured (the message says why)."""


@dataclass(slots=True)
class Recorded:
    """What one :meth:`Ledger.record` did."""

    inserted: int = 0
    duplicates: int = 0
    rejected: int = 0
    flagged: tuple[tuple[str, str, str], ...] = ()  # (tenant, period, margin) newly flagged


class Prepared:
    """A batch :meth:`Ledger.prepare` made ready, its transaction open: :meth:`commit` it
    (from any one thread) or :meth:`rollback` it."""

    def __init__(self, ledger: Ledger, conn: Connection, trans: Any, pricing: Pricing):
        self.ledger = ledger
        self.conn = conn
        self.trans = trans
        self.pricing = pricing
        self.done = Recorded()
        self.batch: list[Event] = []
        self.switched: dict[tuple[str, str], int] = {}
        self.inserted: set[str] | None = None

    def commit(self) -> Recorded:
        """Finish the batch and commit; what was recorded. Raises the database's error
        (then nothing is committed); the connection is given back either way."""
        try:
            self.ledger._complete(self)
            self.trans.commit()
        finally:
            self.conn.close()
        return self.done

    def rollback(self) -> None:
        """Roll back and give the connection back."""
        self.conn.close()


def _redacted(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<not an SQLAlchemy URL>"


class Ledger:
    """The ledger at ``url`` (an SQLAlchemy URL). Cheap to keep; open one per process."""

    def __init__(self, url: str, *, pool_size: int = 2):
        self.url = _redacted(url)
        try:
            parsed = make_url(url)
            self.dialect = parsed.get_backend_name()
            if self.dialect == "sqlite":
                self.engine: Engine = create_engine(
                    parsed, connect_args={"timeout": 60, "isolation_level": None})
                event.listen(self.engine, "connect", _sqlite_connect)
                event.listen(self.engine, "begin", _sqlite_begin)
            elif self.dialect == "postgresql":
                self.engine = create_engine(parsed, pool_pre_ping=True, pool_size=pool_size,
                                            max_overflow=2, pool_recycle=1800)
            else:
                raise LedgerError(f"billing.database {self.url}: only sqlite:// and "
                                  "postgresql+psycopg:// ledgers are supported")
        except (ArgumentError, NoSuchModuleError, ImportError) as exc:
            hint = (" (pip install 'ai-saas-middleware[postgres]')"
                    if isinstance(exc, ImportError) else "")
            raise LedgerError(f"billing.database {self.url}: {exc}{hint}") from None
        self._insert = (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)

    def close(self) -> None:
        self.engine.dispose()

    # -- transactions

    @contextmanager
    def writing(self) -> Iterator[Connection]:
        """One write transaction over every tenant (the worker's, billing's own)."""
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.exec_driver_sql("SELECT set_config('ai_saas.scope', 'all', true)")
            yield conn

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """One read transaction over every tenant (reports, audit, ``ai-saas usage``): on
        SQLite a deferred ``BEGIN``, which takes no write lock (the worker keeps writing
        beside a report), on PostgreSQL with the service scope."""
        with self.engine.connect() as conn:
            conn.info["ai_saas_read"] = True
            try:
                with conn.begin():
                    if self.dialect == "postgresql":
                        conn.exec_driver_sql("SELECT set_config('ai_saas.scope', 'all', true)")
                    yield conn
            finally:
                conn.info.pop("ai_saas_read", None)

    @contextmanager
    def tenant_scope(self, tenant_id: str) -> Iterator[Connection]:
        """A transaction on behalf of ``tenant_id``: on PostgreSQL the RLS policy limits
        every statement in it to that tenant's rows. (SQLite has no row-level security:
        there the caller's own ``WHERE tenant_id = ...`` is all there is.)"""
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT set_config('ai_saas.tenant_id', :t, true)"),
                             {"t": tenant_id})
            yield conn

    # -- schema

    def migrate(self) -> tuple[int, int]:
        """Create or upgrade the schema (:mod:`.migrations`); (version before, after)."""
        before = current = self.version()
        for number, step in enumerate(STEPS, start=1):
            if number <= current:
                continue
            with self.writing() as conn:
                if self.dialect == "postgresql":
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(727274101)")
                if conn.dialect.has_table(conn, t.schema_version.name):
                    done = int(conn.execute(select(func.max(t.schema_version.c.version)))
                               .scalar() or 0)
                    if done >= number:  # another process applied it meanwhile
                        current = done
                        continue
                step(conn, self.dialect)
                conn.execute(t.schema_version.insert(), {"version": number,
                                                         "applied_at": now_iso()})
                self.log_action(conn, "migrate", f"schema version {number}: "
                                f"{(step.__doc__ or '').splitlines()[0]}")
                current = number
        if self.dialect == "postgresql":
            with self.engine.connect() as conn:
                bypass = conn.execute(text("SELECT rolsuper OR rolbypassrls FROM pg_roles "
                                           "WHERE rolname = current_user")).scalar()
            if bypass:
                log.warning("billing: the ledger's database role is a superuser or has "
                            "BYPASSRLS: PostgreSQL applies no row-level security to it")
        return before, current

    def version(self) -> int:
        with self.engine.connect() as conn:
            if not self.engine.dialect.has_table(conn, t.schema_version.name):
                return 0
            return int(conn.execute(select(func.max(t.schema_version.c.version))).scalar() or 0)

    def check_version(self) -> None:
        found = self.version()
        if found != LATEST:
            raise LedgerError(f"the ledger {self.url} is at schema version {found}, this "
                              f"package needs {LATEST}: run 'ai-saas billing migrate'")

    def register(self, pricing: Pricing) -> None:
        """Give each of ``pricing``'s plans its version (inserted when new)."""
        versions: dict[Plan, int] = {}
        with self.writing() as conn:
            for plan in pricing.plans():
                digest = plan.digest()
                conn.execute(self._insert(t.pricing_versions).on_conflict_do_nothing(
                    index_elements=["digest"]), {"digest": digest, "rules": plan.canonical(),
                                                 "created_at": now_iso()})
                versions[plan] = int(conn.execute(
                    select(t.pricing_versions.c.version)
                    .where(t.pricing_versions.c.digest == digest)).scalar_one())
        pricing.bind(versions)

    def log_action(self, conn: Connection, action: str, detail: str) -> None:
        conn.execute(t.billing_log.insert(), {"at": now_iso(), "action": action,
                                              "detail": detail})

    # -- recording

    def record(self, events: Sequence[Event], pricing: Pricing,
               rejected: Iterable[tuple[str, str, str]] = ()) -> Recorded:
        """Price ``events`` and insert them with their aggregates in one transaction;
        ``rejected`` (stream id, reason, raw) go to ``rejected_events``. Raises the
        database's error (nothing committed) when the transaction cannot commit."""
        return self.prepare(events, pricing, rejected).commit()

    def prepare(self, events: Sequence[Event], pricing: Pricing,
                rejected: Iterable[tuple[str, str, str]] = ()) -> Prepared:
        """:meth:`record` in two parts, for the worker to run in two threads: this one
        does this process's share of the work (pricing; the SQLite inserts; the
        PostgreSQL ``COPY`` into the session's staging table) and leaves the transaction
        open; :meth:`Prepared.commit` does the rest (PostgreSQL: the server's insert and
        aggregation) and commits. Until then the transaction holds SQLite's write lock;
        on PostgreSQL it holds nothing another writer waits on (the staged rows are the
        session's own), so the next batch's can be prepared on another connection while
        the server moves this one's."""
        conn = self.engine.connect()
        try:
            trans = conn.begin()
            if self.dialect == "postgresql":
                # work_mem for this transaction: the rows _PG_MOVE returns to its daily
                # aggregation are kept in memory, not spilled to a temporary file.
                conn.exec_driver_sql("SELECT set_config('ai_saas.scope', 'all', true), "
                                     "set_config('work_mem', '64MB', true)")
            prepared = Prepared(self, conn, trans, pricing)
            self._stage(prepared, events, rejected)
        except BaseException:
            conn.close()  # rolls the transaction back
            raise
        return prepared

    def _stage(self, p: Prepared, events: Sequence[Event],
               rejected: Iterable[tuple[str, str, str]]) -> None:
        conn, done, pricing = p.conn, p.done, p.pricing
        unique: dict[str, Event] = {}
        for ev in events:
            if ev.request_id in unique:
                done.duplicates += 1
            else:
                unique[ev.request_id] = ev
        rejected = list(rejected)
        if rejected:
            conn.execute(self._insert(t.rejected_events).on_conflict_do_nothing(), [
                {"stream_id": sid, "reason": reason, "raw": raw, "rejected_at": now_iso()}
                for sid, reason, raw in rejected])
            done.rejected = len(rejected)
        if not unique:
            return
        p.batch = batch = list(unique.values())
        p.switched = switched = self._switched(conn, batch, pricing)
        for ev in batch:
            pricing.price(ev, switched.get((ev.tenant_id, ev.period)))
        # The rows and, in the same statements, the daily aggregates of exactly the
        # rows inserted (on PostgreSQL, by _PG_MOVE in _complete).
        p.inserted = self._insert_events(conn, batch, now_iso())

    def _complete(self, p: Prepared) -> None:
        if not p.batch:
            return
        inserted = p.inserted
        if inserted is None:  # PostgreSQL: the staged rows moved by the server
            inserted = set(p.conn.exec_driver_sql(_PG_MOVE).scalars())
        done, batch = p.done, p.batch
        done.inserted = len(inserted)
        done.duplicates += len(batch) - len(inserted)
        if inserted and p.pricing.margin_rules:
            # Usually every row is new: then no pass over the batch to find which.
            new = batch if len(inserted) == len(batch) else [
                ev for ev in batch if ev.request_id in inserted]
            done.flagged = self._check_margins(p.conn, new, p.pricing, p.switched)

    def _insert_events(self, conn: Connection, batch: list[Event], recorded_at: str
                       ) -> set[str] | None:
        """Insert the rows of ``batch`` not in the ledger yet, and add exactly those rows
        to ``usage_daily``; the request ids inserted. (PostgreSQL: the rows staged, None
        returned: :data:`_PG_MOVE` inserts them.)

        The aggregates are summed by the database from the rows it has just inserted
        (``GROUP BY`` in its own code: the sums a Python loop and a row-per-key upsert
        took cost the worker more than the rest of the insert), sorted by key so that two
        workers upserting the same keys lock them in one order (no deadlock).

        Straight through the driver (SQLAlchemy's per-row parameter processing cost more
        than the database). PostgreSQL: the rows are copied (binary ``COPY``) into a
        temporary table of this session, emptied at every commit, then one ``INSERT ...
        SELECT ... ON CONFLICT DO NOTHING RETURNING`` moves them, so a row another worker
        inserted meanwhile is neither inserted nor counted. (``COPY`` costs this process
        about 2 us a row; the arrays of an ``unnest`` insert, 25 to 35.) SQLite: the
        write transaction holds the database's one write lock (``BEGIN IMMEDIATE``), so
        the rows after the highest rowid before the insert are the batch's, and exactly
        the ones it inserted."""
        # In tenant order: the two tenant_id indexes then take each tenant's rows at one
        # place in turn instead of the batch's 500 tenants over and over (SQLite: 35%
        # less CPU per row inserted; a batch's rows are interleaved from 16 streams).
        rows = sorted([_row(ev, recorded_at) for ev in batch], key=_tenant_of)
        if self.dialect == "postgresql":
            # Made in every transaction: a rolled-back one takes its creation with it, and
            # behind a transaction-pooling proxy the next may be on another session.
            conn.exec_driver_sql(_PG_STAGING)
            driver: Any = conn.connection.driver_connection  # psycopg's Connection
            dbapi_error = conn.dialect.loaded_dbapi.Error
            try:
                with driver.cursor() as cur, cur.copy(_PG_COPY) as copy:
                    copy.set_types(_PG_COPY_TYPES)
                    for row in rows:
                        copy.write_row(row)
            except dbapi_error as exc:
                # The driver's own error, as SQLAlchemy would have raised it (what the
                # worker waits out and retries); a lost connection leaves the pool.
                if driver.closed:
                    conn.invalidate(exc)
                raise DBAPIError.instance(_PG_COPY, None, exc, dbapi_error) from None
            return None
        # The batch's rows are the ones after the highest rowid now: SQLite gives a new
        # row max(rowid) + 1, and no other writer runs until this transaction ends.
        floor = conn.exec_driver_sql("SELECT coalesce(max(rowid), 0) FROM usage_events"
                                     ).scalar()
        # ON CONFLICT DO NOTHING: a request_id already in the ledger is skipped by the
        # unique index's own check (no lookup of the batch's ids first), and the rows
        # after `floor` are exactly the ones inserted.
        inserted = conn.exec_driver_sql(_SQLITE_INSERT, rows).rowcount
        if inserted:
            conn.exec_driver_sql(_SQLITE_DAILY, (floor,))
        if inserted == len(rows):  # the usual case: every row new
            return {row[0] for row in rows}
        return set(conn.exec_driver_sql("SELECT request_id FROM usage_events WHERE rowid > ?",
                                        (floor,)).scalars())

    def _switched(self, conn: Connection, batch: list[Event], pricing: Pricing
                  ) -> dict[tuple[str, str], int]:
        """(tenant, period) -> the margin rule whose pricing it is switched to."""
        if not pricing.switched:
            return {}
        periods = sorted({ev.period for ev in batch})
        tenants = sorted({ev.tenant_id for ev in batch})
        rows = conn.execute(select(t.tenant_flags.c.tenant_id, t.tenant_flags.c.period,
                                   t.tenant_flags.c.rule)
                            .where(t.tenant_flags.c.period.in_(periods))
                            .where(t.tenant_flags.c.tenant_id.in_(tenants)))
        return {(r.tenant_id, r.period): r.rule for r in rows if r.rule in pricing.switched}

    def _check_margins(self, conn: Connection, new: list[Event], pricing: Pricing,
                       switched: dict[tuple[str, str], int]) -> tuple[tuple[str, str, str], ...]:
        """Flag each tenant of ``new`` whose margin in the month is now below a rule's
        threshold (the most severe rule it falls under); a rule that switches pricing
        applies from the tenant's next event."""
        touched = sorted({(ev.tenant_id, ev.period) for ev in new})
        d = t.usage_daily.c
        rows = conn.execute(
            select(d.tenant_id, d.period, func.sum(d.cost_p), func.sum(d.revenue_p))
            .where(d.period.in_(sorted({p for _, p in touched})))
            .where(d.tenant_id.in_(sorted({tn for tn, _ in touched})))
            .group_by(d.tenant_id, d.period)).all()
        existing = {(r.tenant_id, r.period): r.rule for r in conn.execute(
            select(t.tenant_flags.c.tenant_id, t.tenant_flags.c.period, t.tenant_flags.c.rule)
            .where(t.tenant_flags.c.tenant_id.in_(sorted({tn for tn, _ in touched}))))}
        flagged = []
        rules = pricing.margin_rules
        for tenant, period, cost, revenue in rows:
            if (tenant, period) not in touched:
                continue
            cost, revenue = int(cost or 0), int(revenue or 0)
            if revenue == 0 and cost == 0:
                continue
            margin = (Decimal(revenue - cost) / Decimal(revenue)) if revenue else Decimal(-1)
            under = [i for i, rule in enumerate(rules) if margin < rule.below]
            if not under:
                continue
            worst = min(under, key=lambda i: rules[i].below)
            before = existing.get((tenant, period))
            if before is not None and rules[before].below <= rules[worst].below:
                continue
            plan = pricing.switched.get(worst)
            row = {"tenant_id": tenant, "period": period, "rule": worst,
                   "margin": f"{margin:.6f}", "flagged_at": now_iso(),
                   "pricing_version": pricing.versions.get(plan) if plan else None}
            if before is None:
                conn.execute(t.tenant_flags.insert(), row)
            else:
                conn.execute(t.tenant_flags.update()
                             .where(t.tenant_flags.c.tenant_id == tenant)
                             .where(t.tenant_flags.c.period == period), row)
            flagged.append((tenant, period, row["margin"]))
            log.warning("billing: tenant %s's margin in %s is %s, below %s (billing."
                        "marginRules[%d])%s", tenant, period, row["margin"], rules[worst].below,
                        worst, "; priced by that rule from its next event" if plan else "")
        return tuple(flagged)


_COLUMNS = ("request_id", "tenant_id", "tier", "model_id", "provider", "period", "day", "ts",
            "prompt_tokens", "completion_tokens", "usage_source", "cost_p", "revenue_p",
            "saved_p", "outcome_p", "status", "latency_ms", "cache", "fallback_from",
            "endpoint", "truncated", "client_disconnected", "price_version",
            "pricing_version", "stream_id", "recorded_at")
_PG_TYPES = {"prompt_tokens": "bigint", "completion_tokens": "bigint", "cost_p": "bigint",
             "revenue_p": "bigint", "saved_p": "bigint", "outcome_p": "bigint",
             "status": "integer", "latency_ms": "integer", "truncated": "boolean",
             "client_disconnected": "boolean", "price_version": "integer",
             "pricing_version": "integer"}
_PG_STAGING = ("CREATE TEMPORARY TABLE IF NOT EXISTS usage_events_incoming "
               "(LIKE usage_events) ON COMMIT DELETE ROWS")
_PG_COPY = f"COPY usage_events_incoming ({', '.join(_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
# Binary COPY sends each value in its column's own format: text serves the varchar columns.
_PG_COPY_TYPES = [_PG_TYPES.get(c, "text") for c in _COLUMNS]
_DAILY_COLUMNS = ("tenant_id", "day", "model_id", "period", *_SUMMED)


def _daily_upsert(source: str, where: str) -> str:
    """``INSERT INTO usage_daily`` the sums of ``source``'s rows (``where``), per key, in
    key order; a key already there has them added."""
    return (f"INSERT INTO usage_daily ({', '.join(_DAILY_COLUMNS)}) "
            "SELECT tenant_id, day, model_id, min(period), count(*), "
            "sum(CASE WHEN status >= 400 THEN 1 ELSE 0 END), sum(prompt_tokens), "
            "sum(completion_tokens), sum(cost_p), sum(revenue_p), "
            "sum(CASE WHEN cache = 'hit' THEN 1 ELSE 0 END), sum(saved_p), "
            "coalesce(sum(outcome_p), 0), count(outcome_p) "
            f"FROM {source} WHERE {where} GROUP BY tenant_id, day, model_id "
            "ORDER BY tenant_id, day, model_id "
            "ON CONFLICT (tenant_id, day, model_id) DO UPDATE SET "
            + ", ".join(f"{c} = usage_daily.{c} + excluded.{c}" for c in _SUMMED))


# One statement: the staged rows not in the ledger yet are inserted, and the same rows
# (RETURNING: exactly those inserted, never one another worker inserted meanwhile) are
# summed into usage_daily. Only the columns summed are returned: all 27 of a batch's rows
# overflowed work_mem into a temporary file (4 MB per 16,000 rows).
_DAILY_SOURCE = ("request_id", "tenant_id", "day", "model_id", "period", "status",
                 "prompt_tokens", "completion_tokens", "cost_p", "revenue_p", "cache",
                 "saved_p", "outcome_p")
_PG_MOVE = (f"WITH moved AS (INSERT INTO usage_events ({', '.join(_COLUMNS)}) "
            f"SELECT {', '.join(_COLUMNS)} FROM usage_events_incoming "
            f"ON CONFLICT (request_id) DO NOTHING RETURNING {', '.join(_DAILY_SOURCE)}), "
            f"daily AS ({_daily_upsert('moved', 'true')}) "
            "SELECT request_id FROM moved")
_SQLITE_DAILY = _daily_upsert("usage_events", "rowid > ?")
_SQLITE_INSERT = (f"INSERT INTO usage_events ({', '.join(_COLUMNS)}) VALUES "
                  f"({', '.join('?' * len(_COLUMNS))}) ON CONFLICT (request_id) DO NOTHING")
assert set(_COLUMNS) | {"delivery"} == set(t.usage_events.c.keys())


def _row(ev: Event, recorded_at: str) -> tuple[Any, ...]:
    return (ev.request_id, ev.tenant_id, ev.tier, ev.model_id, ev.provider, ev.period, ev.day,
            ev.ts, ev.prompt_tokens, ev.completion_tokens, ev.usage_source, ev.cost_p,
            ev.revenue_p, ev.saved_p, ev.outcome_p, ev.status, ev.latency_ms, ev.cache,
            ev.fallback_from, ev.endpoint, ev.truncated, ev.client_disconnected,
            ev.price_version, ev.pricing_version, ev.stream_id, recorded_at)


def _tenant_of(row: tuple[Any, ...]) -> str:
    return row[1]  # type: ignore[no-any-return]


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers never block the writer; synchronous=FULL: a commit the worker then
    # acknowledges in Redis survives a power cut, not only a crash.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=60000")
    # 64 MiB of page cache (the default is 2 MiB), taken as pages are used: each insert
    # lands at a random place in the request_id index, and once that index outgrew the
    # cache every row cost a page read from the OS (benchmarks/worker.py: the rows of a
    # 100,000-event drain grew from 11 to 50 us each; with it, 18 to 25).
    cur.execute("PRAGMA cache_size=-65536")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN" if conn.info.get("ai_saas_read") else "BEGIN IMMEDIATE")

