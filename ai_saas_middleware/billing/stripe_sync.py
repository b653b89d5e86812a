"""Usage from the ledger to Stripe, exactly once (reconciling: :mod:`.stripe_reconcile`).

Delivery state lives in the ledger, never only in memory:

1. :meth:`Deliverer.gather` claims, in one write transaction, the events no meter event
   carries yet (``usage_events.delivery IS NULL``) of every tenant that has a Stripe
   customer, groups them per tenant x month, and writes one ``stripe_deliveries`` row
   per group (``pending``), its ``identifier`` derived from what it carries (tenant,
   month and a SHA-256 of the event name and the sorted request ids); each event's
   ``delivery`` names it (set by primary key, for exactly the rows claimed). The claim
   is ``SELECT ... WHERE delivery IS NULL FOR UPDATE``: on SQLite inside ``BEGIN
   IMMEDIATE`` (one writer at a time), on PostgreSQL under READ COMMITTED, where a claim
   that waited on another worker's locks re-checks ``delivery IS NULL`` once that
   commits and skips the rows it took. No event is ever claimed twice.
2. :meth:`Deliverer.send` sends every pending delivery (the v2 meter event stream when
   more than ``billing.stripe.streamAbove`` are pending) and marks each ``delivered``
   once Stripe has it. A crash between Stripe's answer and that mark leaves it
   ``pending``; the next run sends the same identifier again and Stripe counts it once.

Timeline of a crash (why the identifier, not the ledger, is what makes it once)::

    worker A                     ledger                    Stripe
    gather: claim e1..e9  ---->  delivery d (pending)
    send d                --------------------------------> stores d, answers 200
    (killed)                     d still pending
    worker B: send d      --------------------------------> "already exists": counted once
    mark d delivered      ---->  d delivered

Tenants without a customer (``customer_of`` answers ``None``) keep their events
undelivered: they are billed through Stripe from the moment a customer is set, backlog
included. Finding them costs one index probe per tenant per gather (a loose scan of the
partial index ``usage_events_undelivered``), never a rescan of their events; the
deliverer asks ``customer_of`` about such a tenant again at most once a minute and logs
it once.

Concurrent senders (two workers) may both send a pending delivery; Stripe's identifier
dedup makes that count once. Stripe keeps identifiers for at least 24 hours, which is
far longer than any delivery stays pending but for a Stripe outage of a day.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from ..config import Config, StripeConfig
from ..errors import AISaaSError, ConfigError, ConfigProblem
from ..store.redis import RedisStore
from . import tables as t
from .clock import now_iso
from .ledger import Ledger
from .stripe_client import STREAM_BATCH, MeterEvent, StripeMeter, StripeRefused, StripeUnavailable

__all__ = ["TICK_BUDGET_S", "Deliverer", "Sent", "customers_of", "identifier_of", "units"]

log = logging.getLogger("ai_saas_middleware.billing")

CLAIM_LIMIT = 100_000  # events one tenant's claim takes per gather (bounds a transaction)
TICK_BUDGET_S = 10.0  # backoff one tick() may spend on an unwell Stripe
_NO_CUSTOMER_RECHECK_S = 60.0
_ID_CHUNK = 500  # request ids per UPDATE ... IN (...)

_DISTINCT_UNDELIVERED = text(
    # A loose index scan: one probe of usage_events_undelivered per tenant, however many
    # undelivered events each has.
    # ORDER BY ... LIMIT 1 rather than MIN(): under PostgreSQL's row-level security the
    # policy's filter is evaluated on each row, so MIN() cannot stop at the index's first
    # entry; an ordered index scan with LIMIT 1 does.
    "WITH RECURSIVE u(tenant_id) AS ("
    " SELECT (SELECT e.tenant_id FROM usage_events e WHERE e.delivery IS NULL"
    "         ORDER BY e.tenant_id LIMIT 1)"
    " UNION ALL"
    " SELECT (SELECT e.tenant_id FROM usage_events e"
    "         WHERE e.delivery IS NULL AND e.tenant_id > u.tenant_id"
    "         ORDER BY e.tenant_id LIMIT 1)"
    " FROM u WHERE u.tenant_id IS NOT NULL)"
    " SELECT tenant_id FROM u WHERE tenant_id IS NOT NULL")


def units(metric: str, prompt_tokens: int, completion_tokens: int) -> int:
    """Whole units of ``billing.usageMetric`` one event carries."""
    if metric == "input_tokens":
        return prompt_tokens
    if metric == "output_tokens":
        return completion_tokens
    if metric == "requests":
        return 1
    return prompt_tokens + completion_tokens


def _unix(ts: str) -> int:
    return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp())


def identifier_of(tenant: str, period: str, event_name: str, request_ids: list[str]) -> str:
    """The meter event identifier of a group: at most 64 + 1 + 7 + 1 + 24 = 97 characters
    (Stripe takes 100), the same for the same events wherever computed."""
    digest = hashlib.sha256("\n".join([event_name, *sorted(request_ids)]).encode())
    return f"{tenant}.{period}.{digest.hexdigest()[:24]}"


def customers_of(config: Config, store: RedisStore | None = None
                 ) -> Callable[[str], str | None]:
    """``tenant id -> Stripe customer id``: ``tenants[].stripeCustomerId``, else (with a
    ``store``) the Redis-stored tenant's, looked up once per tenant."""
    table = {tid: tc.stripe_customer_id for tid, tc in config.tenants.items()}
    if store is None:
        return table.get
    from ..tenants import TenantAdmin

    admin = TenantAdmin(config, store)
    stored: dict[str, str | None] = {}

    def customer_of(tenant_id: str) -> str | None:
        if tenant_id in table:
            return table[tenant_id]
        if tenant_id not in stored:
            try:
                stored[tenant_id] = admin.get(tenant_id).stripe_customer_id
            except AISaaSError:  # not stored (or Redis unreachable: asked again later)
                return None
        return stored[tenant_id]

    return customer_of


@dataclass(slots=True)
class Sent:
    """What one :meth:`Deliverer.send` did."""

    delivered: int = 0  # Stripe took it now
    duplicates: int = 0  # Stripe had it already (a re-send after a crash): delivered
    failed: int = 0  # Stripe refused it for good (state failed, last_error says why)
    pending: int = 0  # left for the next round (Stripe unreachable or refusing the key)
    errors: list[str] = field(default_factory=list)


class Deliverer:
    """Moves the ledger's usage to Stripe (see the module docstring).

    ``customer_of(tenant)`` answers the tenant's Stripe customer id or ``None``;
    ``meter`` is the Stripe side (default: a :class:`StripeMeter` of
    ``config.billing.stripe``, which raises :class:`StripeUnavailable` when the API key's
    environment variable is unset). ``clock`` times :meth:`tick`.
    """

    def __init__(self, config: Config, ledger: Ledger, customer_of: Callable[[str], str | None],
                 *, meter: StripeMeter | None = None,
                 clock: Callable[[], float] = time.monotonic, claim_limit: int = CLAIM_LIMIT):
        stripe = config.billing.stripe
        if stripe is None:
            raise ConfigError([ConfigProblem("billing.stripe", "a mapping (where to send "
                                             "usage)", "nothing")])
        self.stripe: StripeConfig = stripe
        self.metric = config.billing.usage_metric
        self.ledger = ledger
        self.customer_of = customer_of
        self.meter = meter if meter is not None else StripeMeter(stripe)
        self._clock = clock
        self._claim_limit = claim_limit
        self._last: float | None = None
        self._no_customer: dict[str, float] = {}  # tenant -> when customer_of said None
        # The round in progress ends (no more gathering or sending) at this instant on the
        # meter's clock; None: when it is done.
        self._until: float | None = None
        self._halted = False  # halt(): the worker is stopping
        self._final = False  # the round in progress is the worker's last (flush(final=True))

    # -- gathering

    def _customer(self, tenant: str) -> str | None:
        asked = self._no_customer.get(tenant)
        now = self._clock()
        if asked is not None and now - asked < _NO_CUSTOMER_RECHECK_S:
            return None
        customer = self.customer_of(tenant)
        if customer:
            self._no_customer.pop(tenant, None)
            return customer
        if asked is None:
            log.warning("stripe: tenant %s has usage but no stripeCustomerId: its events "
                        "wait in the ledger, undelivered, until it has one", tenant)
        self._no_customer[tenant] = now
        return None

    def gather(self) -> int:
        """Claim the undelivered events of tenants with a customer into pending
        deliveries, in one transaction; the number of deliveries created."""
        created = 0
        ue = t.usage_events.c
        with self.ledger.writing() as conn:
            if self.ledger.dialect == "postgresql":
                # Statistics lag a bulk insert until autovacuum analyzes the table; a
                # bitmap scan planned on them reads every undelivered row per probe of
                # the loose scan (16 s instead of 0.1 s for 100,000 events). The ordered
                # index scan is right at any size. For this transaction only.
                conn.exec_driver_sql("SET LOCAL enable_bitmapscan = off")
            tenants = [row[0] for row in conn.execute(_DISTINCT_UNDELIVERED)]
            for tenant in tenants:
                customer = self._customer(tenant)
                if customer is None:
                    continue
                # FOR UPDATE (PostgreSQL; SQLite's BEGIN IMMEDIATE already excludes every
                # other writer): a row another worker is claiming is waited for, then
                # re-checked, and skipped once its delivery is set. What this returns is
                # ours alone until commit.
                rows = conn.execute(
                    select(ue.request_id, ue.period, ue.ts, ue.prompt_tokens,
                           ue.completion_tokens)
                    .where(ue.tenant_id == tenant, ue.delivery.is_(None))
                    .limit(self._claim_limit).with_for_update()).all()
                groups: dict[str, list[Any]] = {}
                for row in rows:
                    groups.setdefault(row.period, []).append(row)
                for period, group in sorted(groups.items()):
                    created += self._delivery(conn, tenant, customer, period, group)
        if created:
            log.info("stripe: gathered %d meter event(s)", created)
        return created

    def _delivery(self, conn: Connection, tenant: str, customer: str, period: str,
                  group: list[Any]) -> int:
        ids = [row.request_id for row in group]
        ident = identifier_of(tenant, period, self.stripe.event_name, ids)
        value = sum(units(self.metric, r.prompt_tokens, r.completion_tokens) for r in group)
        conn.execute(t.stripe_deliveries.insert(), {
            "identifier": ident, "tenant_id": tenant, "customer": customer,
            "event_name": self.stripe.event_name, "period": period, "value": value,
            "timestamp": max(_unix(r.ts) for r in group), "events": len(group),
            "state": "pending", "attempts": 0, "created_at": now_iso(),
            "delivered_at": None, "last_error": None})
        for start in range(0, len(ids), _ID_CHUNK):
            conn.execute(update(t.usage_events)
                         .where(t.usage_events.c.request_id.in_(ids[start:start + _ID_CHUNK]))
                         .values(delivery=ident))
        return 1

    # -- sending

    def _pending(self) -> list[Any]:
        d = t.stripe_deliveries.c
        with self.ledger.reading() as conn:
            return list(conn.execute(
                select(d.identifier, d.event_name, d.customer, d.value, d.timestamp,
                       d.attempts)
                .where(d.state == "pending").order_by(d.created_at, d.identifier)).all())

    def _mark(self, identifiers: list[str], attempts: int, state: str = "delivered",
              error: str | None = None) -> None:
        d = t.stripe_deliveries.c
        with self.ledger.writing() as conn:
            conn.execute(
                update(t.stripe_deliveries)
                .where(d.identifier.in_(identifiers), d.state == "pending")
                .values(state=state, attempts=d.attempts + attempts, last_error=error,
                        delivered_at=now_iso() if state == "delivered" else None))

    def _in_time(self) -> bool:
        """Whether the round in progress may go on (gather more, send the next)."""
        if self._halted and not self._final:
            return False
        return self._until is None or self.meter.clock() < self._until

    def send(self) -> Sent:
        """Send every pending delivery to Stripe, marking each as Stripe takes it."""
        done = Sent()
        rows = self._pending()
        if not rows:
            return done
        events = [MeterEvent(r.identifier, r.event_name, r.customer, int(r.value),
                             int(r.timestamp)) for r in rows]
        attempts = {r.identifier: int(r.attempts) for r in rows}
        if len(rows) > self.stripe.stream_above:
            self._send_stream(events, attempts, done)
        else:
            self._send_each(events, attempts, done)
        if done.delivered or done.duplicates or done.failed:
            log.info("stripe: %d meter event(s) delivered, %d already there, %d refused, "
                     "%d pending", done.delivered, done.duplicates, done.failed, done.pending)
        return done

    def _send_each(self, events: list[MeterEvent], attempts: dict[str, int],
                   done: Sent) -> None:
        for i, ev in enumerate(events):
            if not self._in_time():  # the rest stays pending in the ledger
                done.pending += len(events) - i
                return
            try:
                duplicate, made = self.meter.create(ev, attempts[ev.identifier])
            except StripeRefused as exc:
                self._mark([ev.identifier], 1, "failed", exc.reason)
                log.error("stripe: meter event %s refused: %s", ev.identifier, exc.reason)
                done.failed += 1
                done.errors.append(exc.reason)
                continue
            except StripeUnavailable as exc:
                # Stripe is down or refuses our key: the rest waits for the next round.
                self._mark([ev.identifier], self.stripe.max_retries + 1, "pending", str(exc))
                done.pending += len(events) - i
                done.errors.append(str(exc))
                log.error("stripe: %s; %d meter event(s) wait for the next round", exc,
                          len(events) - i)
                return
            self._mark([ev.identifier], made)
            if duplicate:
                done.duplicates += 1
            else:
                done.delivered += 1

    def _send_stream(self, events: list[MeterEvent], attempts: dict[str, int],
                     done: Sent) -> None:
        sent = 0
        try:
            # One attempt base for the whole stream: the largest a delivery in it has seen.
            for batch, made in self.meter.stream(events, max(attempts.values())):
                self._mark([ev.identifier for ev in batch], made)
                sent += len(batch)
                done.delivered += len(batch)
                if not self._in_time():  # the rest stays pending in the ledger
                    done.pending += len(events) - sent
                    break
        except StripeRefused as exc:
            batch_ids = [ev.identifier for ev in events[sent:sent + STREAM_BATCH]]
            self._mark(batch_ids, 1, "failed", exc.reason)
            done.failed += len(batch_ids)
            done.pending += len(events) - sent - len(batch_ids)
            done.errors.append(exc.reason)
            log.error("stripe: a meter event stream batch of %d was refused: %s",
                      len(batch_ids), exc.reason)
        except StripeUnavailable as exc:
            self._mark([ev.identifier for ev in events[sent:sent + STREAM_BATCH]],
                       self.stripe.max_retries + 1, "pending", str(exc))
            done.pending += len(events) - sent
            done.errors.append(str(exc))
            log.error("stripe: %s; %d meter event(s) wait for the next round", exc,
                      len(events) - sent)

    # -- the worker's calls

    def halt(self) -> None:
        """The worker is stopping (signal-safe): the round in progress ends soon -- no
        more gathering, no retry sleeps, no next send; what it has not sent stays pending
        in the ledger -- and no other starts but the final one (``flush(final=True)``)."""
        self._halted = True
        self.meter.deadline = self.meter.clock()

    def flush(self, budget_s: float | None = None, *, final: bool = False) -> Sent:
        """Gather everything undelivered and send it now. ``budget_s`` bounds the time
        spent retrying an unwell Stripe; with ``final`` (the worker's last round, after
        :meth:`halt`: it passes a few seconds) it bounds the whole round, gathering and
        sending too. What is not sent by then stays pending in the ledger for the next
        run."""
        clock = self.meter.clock
        budget_until = None if budget_s is None else clock() + budget_s
        self._final = final
        self._until = budget_until if final else None
        try:
            while self._in_time() and self.gather():
                pass
            # (After halt(), retries end at once: the deadline is now.)
            self.meter.deadline = clock() if self._halted and not final else budget_until
            sent = self.send()
        finally:
            self.meter.deadline = clock() if self._halted and not final else None
            self._until = None
            self._final = False
        self._last = self._clock()
        return sent

    def tick(self) -> Sent | None:
        """:meth:`flush` when ``billing.stripe.interval`` has passed since the last one
        (the worker calls this after every batch); ``None`` when it was not yet time, or
        when the ledger failed the round (logged; its transactions rolled back, so the
        next tick starts from a consistent ledger): delivery never stops ingestion.
        Retries of an unwell Stripe end after :data:`TICK_BUDGET_S` of backoff (what is
        left stays pending for the next tick), whatever ``maxRetries`` and Stripe's
        ``Retry-After`` would allow (``Worker.run`` ticks in a thread of its own; ``drain``
        between batches)."""
        if self._halted or (self._last is not None
                            and self._clock() - self._last < self.stripe.interval_s):
            return None
        try:
            return self.flush(budget_s=TICK_BUDGET_S)
        except SQLAlchemyError as exc:
            self._last = self._clock()
            log.error("stripe: the delivery round failed on the ledger, retried in %ss: "
                      "%s", self.stripe.interval_s, type(exc).__name__)
            return None
