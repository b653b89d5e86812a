"""``ai-saas billing reprice --period YYYY-MM``: price a month's events again, explicitly.

:func:`reprice` runs in **one ledger transaction** (all of it or nothing):

1. the current configuration's plans are registered (:meth:`Ledger.register`), so each
   row records the version of the plan that now priced it;
2. every event of the period is priced with :class:`~.rates.Pricing`; a tenant flagged in
   ``tenant_flags`` for the period by a ``billing.marginRules`` entry that switches
   pricing gets that rule's plan for the events recorded after it was flagged (what the
   worker did live: the switch applies from the tenant's next event), the base plan for
   the others. Flags are kept as they are (not re-evaluated); their ``pricing_version``
   becomes the switched plan's new version;
3. ``revenue_p`` and ``pricing_version`` of each row whose price changed are updated,
   and ``usage_daily.revenue_p`` of the period is rebuilt from the rows;
4. a ``billing_log`` entry (action ``reprice``) records the period, the plans' versions,
   the number of events and of changed ones, and the revenue before and after, in total
   and per tenant.

On PostgreSQL the transaction holds ``usage_daily`` in ``EXCLUSIVE`` mode: workers keep
reading, and their next batch waits for the reprice to commit (then adds to the rebuilt
sums). ``--dry-run`` does the same work in a transaction that is rolled back and registers no
plan: nothing is written (a plan not yet in the ledger shows as version ``new``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from decimal import Decimal

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.exc import SQLAlchemyError

from ..budgets import from_picodollars
from ..config import Config
from ..pricing import format_usd
from ..tabulate import table
from . import tables as t
from .events import Event
from .ledger import Ledger, LedgerError
from .rates import Plan, Pricing

__all__ = ["Repriced", "cmd_reprice", "reprice"]

PAGE = 5000  # events read and updated at a time (keyset pages: bounded memory)
_EVENT_FIELDS = tuple(f.name for f in fields(Event) if f.name not in ("revenue_p",
                                                                      "pricing_version"))
_FIELD_COUNT = len(_EVENT_FIELDS)


@dataclass(slots=True)
class Repriced:
    """What :func:`reprice` did (or, in a dry run, would do)."""

    period: str
    dry_run: bool
    versions: dict[str, int | None] = field(default_factory=dict)  # plan -> version
    events: int = 0
    changed: int = 0
    before_p: dict[str, int] = field(default_factory=dict)  # tenant -> revenue
    after_p: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # tenant -> events

    @property
    def total_before(self) -> Decimal:
        return from_picodollars(sum(self.before_p.values()))

    @property
    def total_after(self) -> Decimal:
        return from_picodollars(sum(self.after_p.values()))

    def detail(self) -> str:
        """The ``billing_log`` entry's detail: JSON, money as decimal strings."""
        return json.dumps({
            "period": self.period, "pricing_versions": self.versions,
            "events": self.events, "changed": self.changed,
            "before": format_usd(self.total_before), "after": format_usd(self.total_after),
            "tenants": {tn: [format_usd(from_picodollars(self.before_p[tn])),
                             format_usd(from_picodollars(self.after_p[tn]))]
                        for tn in sorted(self.before_p)},
        }, sort_keys=True)


class _DryRun(Exception):
    """Raised inside the transaction to roll it back."""


@contextmanager
def _transaction(ledger: Ledger, dry_run: bool) -> Iterator[Connection]:
    try:
        with ledger.writing() as conn:
            yield conn
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass


def _plan_names(pricing: Pricing) -> dict[str, Plan]:
    names: dict[str, Plan] = {"base": pricing.base}
    for i, plan in pricing.switched.items():
        names[f"billing.marginRules[{i}]"] = plan
    return names


def _known_versions(conn: Connection, pricing: Pricing) -> None:
    """Bind the versions the ledger already has for ``pricing``'s plans (dry run)."""
    digests = {plan.digest(): plan for plan in pricing.plans()}
    rows = conn.execute(select(t.pricing_versions.c.digest, t.pricing_versions.c.version)
                        .where(t.pricing_versions.c.digest.in_(sorted(digests))))
    pricing.bind({digests[r.digest]: int(r.version) for r in rows})


def reprice(ledger: Ledger, config: Config, period: str, *, dry_run: bool = False
            ) -> Repriced:
    """Price every event of ``period`` again with ``config``'s pricing (see the module
    docstring); with ``dry_run`` nothing is written."""
    ledger.check_version()
    pricing = Pricing(config.billing)
    done = Repriced(period, dry_run)
    if not dry_run:
        ledger.register(pricing)
    e = t.usage_events.c
    update = (t.usage_events.update().where(e.request_id == bindparam("rid"))
              .values(revenue_p=bindparam("revenue"), pricing_version=bindparam("version")))
    with _transaction(ledger, dry_run) as conn:
        if dry_run:
            _known_versions(conn, pricing)
        elif ledger.dialect == "postgresql":
            # A worker's batch upserts usage_daily after inserting its rows: held here
            # until this commits, its sums land on the rebuilt ones instead of being
            # overwritten by a rebuild that could not see its uncommitted rows. (SQLite:
            # BEGIN IMMEDIATE already admits one writer at a time.) Reads go on.
            conn.exec_driver_sql(f"LOCK TABLE {t.usage_daily.name} IN EXCLUSIVE MODE")
        done.versions = {name: pricing.versions.get(plan)
                         for name, plan in _plan_names(pricing).items()}
        flags = {r.tenant_id: (int(r.rule), r.flagged_at) for r in conn.execute(
            select(t.tenant_flags.c.tenant_id, t.tenant_flags.c.rule,
                   t.tenant_flags.c.flagged_at).where(t.tenant_flags.c.period == period))
            if int(r.rule) in pricing.switched}
        columns = [e[name] for name in _EVENT_FIELDS] + [e.revenue_p, e.pricing_version,
                                                         e.recorded_at]
        last = ""
        daily: dict[tuple[str, str, str], int] = {}
        while True:
            page = conn.execute(select(*columns).where(e.period == period)
                                .where(e.request_id > last).order_by(e.request_id)
                                .limit(PAGE)).all()
            if not page:
                break
            last = page[-1].request_id
            changes = []
            for row in page:
                ev = Event(*row[:_FIELD_COUNT])  # the columns are selected in field order
                flag = flags.get(ev.tenant_id)
                # Recorded after the flag: the worker priced it by the switched plan.
                switched = flag[0] if flag is not None and row.recorded_at > flag[1] else None
                pricing.price(ev, switched)
                tenant = ev.tenant_id
                done.events += 1
                done.counts[tenant] = done.counts.get(tenant, 0) + 1
                done.before_p[tenant] = done.before_p.get(tenant, 0) + int(row.revenue_p)
                done.after_p[tenant] = done.after_p.get(tenant, 0) + ev.revenue_p
                key = (tenant, ev.day, ev.model_id)
                daily[key] = daily.get(key, 0) + ev.revenue_p
                if ev.revenue_p != row.revenue_p or ev.pricing_version != row.pricing_version:
                    changes.append({"rid": ev.request_id, "revenue": ev.revenue_p,
                                    "version": ev.pricing_version})
            done.changed += len(changes)
            if changes and not dry_run:
                conn.execute(update, changes)
        if dry_run:
            return done  # the transaction is rolled back: nothing was written
        # The aggregates' revenue, summed from every row of the period as now priced
        # (a correlated UPDATE would scan a tenant's month once per day x model).
        d = t.usage_daily.c
        conn.execute(t.usage_daily.update().where(d.period == period).values(revenue_p=0))
        if daily:
            conn.execute(t.usage_daily.update()
                         .where(d.tenant_id == bindparam("tn")).where(d.day == bindparam("dy"))
                         .where(d.model_id == bindparam("md"))
                         .values(revenue_p=bindparam("revenue")),
                         [{"tn": k[0], "dy": k[1], "md": k[2], "revenue": v}
                          for k, v in sorted(daily.items())])
        for tenant, (rule, _) in sorted(flags.items()):
            conn.execute(t.tenant_flags.update()
                         .where(t.tenant_flags.c.tenant_id == tenant)
                         .where(t.tenant_flags.c.period == period)
                         .values(pricing_version=pricing.versions.get(pricing.switched[rule])))
        ledger.log_action(conn, "reprice", done.detail())
    return done


def format_repriced(done: Repriced) -> str:
    """Before and after per tenant, then the totals, as a text table."""
    versions = ", ".join(f"{name} v{'new' if v is None else v}"
                         for name, v in done.versions.items())
    head = (f"reprice {done.period}{' (dry run: nothing written)' if done.dry_run else ''}: "
            f"{done.events} events, {done.changed} "
            f"{'would change' if done.dry_run else 'changed'}; pricing {versions}")
    if not done.events:
        return head + f"\nno events in {done.period}."
    rows = [["tenant", "events", "revenue_before", "revenue_after", "change"]]
    for tenant in sorted(done.before_p):
        before, after = done.before_p[tenant], done.after_p[tenant]
        rows.append([tenant, str(done.counts[tenant]), format_usd(from_picodollars(before)),
                     format_usd(from_picodollars(after)),
                     format_usd(from_picodollars(after - before))])
    before_p, after_p = sum(done.before_p.values()), sum(done.after_p.values())
    rows.append(["total", str(done.events), format_usd(from_picodollars(before_p)),
                 format_usd(from_picodollars(after_p)),
                 format_usd(from_picodollars(after_p - before_p))])
    return f"{head}\n{table(rows)}"


def cmd_reprice(args: argparse.Namespace) -> int:
    """``ai-saas billing reprice``: price ``--period`` again and print before and after."""
    from ..config import load_config

    config = load_config(args.config)
    ledger = Ledger(args.database or config.billing.database)
    try:
        done = reprice(ledger, config, args.period, dry_run=args.dry_run)
    except SQLAlchemyError as exc:
        raise LedgerError(f"the ledger {ledger.url}: reprice failed, nothing changed: "
                          f"{getattr(exc, 'orig', None) or exc}") from None
    finally:
        ledger.close()
    print(format_repriced(done))
    return 0
