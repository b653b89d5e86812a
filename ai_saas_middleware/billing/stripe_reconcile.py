"""``ai-saas billing reconcile --period YYYY-MM``: the ledger against Stripe.

Per Stripe customer, the month's units in the ledger (``usage_events``), what its meter
events carry (``stripe_deliveries``, by state) and what Stripe's meter event summaries
add up to (:meth:`~.stripe_client.StripeMeter.summary`), and every way they differ:
``missing_in_stripe`` / ``extra_in_stripe`` (Stripe's sum below / above the delivered
meter events), ``pending`` and ``failed`` meter events, ``undelivered`` events not yet
gathered, and ``ledger_mismatch`` (meter events and ungathered events not adding up to
the month's events). Usage of tenants without a customer is a note, not a difference.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from ..admission import month_bounds
from ..store.redis import RedisStore
from ..tabulate import table
from . import tables as t
from .ledger import Ledger, LedgerError
from .stripe_client import StripeMeter, StripeRefused, StripeUnavailable
from .stripe_sync import customers_of

__all__ = ["Difference", "Reconciliation", "Row", "cmd_reconcile", "reconcile"]


@dataclass(frozen=True, slots=True)
class Difference:
    """One way the ledger and Stripe disagree for a customer in a month."""

    customer: str
    tenants: tuple[str, ...]
    # missing_in_stripe | extra_in_stripe | undelivered | pending | failed | ledger_mismatch
    kind: str
    units: int | Decimal
    detail: str

    def __str__(self) -> str:
        return f"{self.customer} ({', '.join(self.tenants)}): {self.kind}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Row:
    """One Stripe customer's month: the ledger's units, the delivered meter events' and
    Stripe's summaries' (in ``billing.usageMetric``)."""

    customer: str
    tenants: tuple[str, ...]
    ledger: int  # units of the month's events
    delivered: int  # units of its delivered meter events
    stripe: Decimal  # what Stripe's event summaries add up to


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """What :func:`reconcile` found: a row per customer, every difference, and notes
    (usage of tenants not billed through Stripe)."""

    rows: list[Row]
    differences: list[Difference]
    notes: list[str]


def reconcile(ledger: Ledger, meter: StripeMeter, metric: str, period: str,
              customer_of: Callable[[str], str | None]) -> Reconciliation:
    """Compare, per Stripe customer, the ledger's units for ``period`` with Stripe's
    meter event summaries (see :class:`Reconciliation`)."""
    ue, d = t.usage_events.c, t.stripe_deliveries.c
    tokens = {"tokens": ue.prompt_tokens + ue.completion_tokens,
              "input_tokens": ue.prompt_tokens, "output_tokens": ue.completion_tokens}
    amount = func.sum(tokens[metric]) if metric in tokens else func.count()
    with ledger.reading() as conn:
        totals = {r[0]: int(r[1] or 0) for r in conn.execute(
            select(ue.tenant_id, amount).where(ue.period == period).group_by(ue.tenant_id))}
        waiting = {r[0]: (int(r[1]), int(r[2] or 0)) for r in conn.execute(
            select(ue.tenant_id, func.count(), amount)
            .where(ue.period == period, ue.delivery.is_(None)).group_by(ue.tenant_id))}
        deliveries = conn.execute(
            select(d.tenant_id, d.customer, d.state, func.count(), func.sum(d.value),
                   func.max(d.last_error))
            .where(d.period == period).group_by(d.tenant_id, d.customer, d.state)).all()
    by_customer: dict[str, dict[str, Any]] = {}

    def entry(customer: str) -> dict[str, Any]:
        return by_customer.setdefault(customer, {"tenants": set(), "ledger": 0,
                                                 "delivered": 0, "carried": 0})

    differences: list[Difference] = []
    for tenant, total in sorted(totals.items()):
        customer = customer_of(tenant)
        if customer is None:
            continue  # listed below as undelivered, with the reason
        e = entry(customer)
        e["tenants"].add(tenant)
        e["ledger"] += total
    for tenant, customer, state, count, value, error in deliveries:
        e = entry(customer)
        e["tenants"].add(tenant)
        e["carried"] += int(value or 0)
        if state == "delivered":
            e["delivered"] += int(value or 0)
        else:
            detail = f"{count} meter event(s) of {int(value or 0)} {metric} {state}"
            if error:
                detail += f" (last error: {error})"
            differences.append(Difference(customer, (tenant,), state, int(value or 0), detail))
    notes = []
    for tenant, (count, value) in sorted(waiting.items()):
        customer = customer_of(tenant)
        if customer is None:
            # Not billed through Stripe (yet): a fact to show, not a disagreement.
            notes.append(f"{tenant}: {count} event(s) of {value} {metric} not billed "
                         "through Stripe: the tenant has no stripeCustomerId")
            continue
        entry(customer)["carried"] += value
        differences.append(Difference(customer, (tenant,), "undelivered", value,
                                      f"{count} event(s) of {value} {metric} not yet "
                                      "gathered into a meter event"))
    _, start, end = month_bounds(int(period[:4]), int(period[5:7]))
    meter_id = meter.meter_id()
    rows = []
    for customer, e in sorted(by_customer.items()):
        seen = meter.summary(meter_id, customer, start, end)
        tenants = tuple(sorted(e["tenants"]))
        rows.append(Row(customer, tenants, e["ledger"], e["delivered"], seen))
        if e["carried"] != e["ledger"]:
            # The meter events (sent or not) and the ungathered events should add up to
            # the month's usage; they do not when usageMetric changed mid-month, or rows
            # were changed by hand.
            differences.append(Difference(customer, tenants, "ledger_mismatch",
                                          e["ledger"] - e["carried"],
                                          f"the month's events add up to {e['ledger']} "
                                          f"{metric}, its meter events and ungathered "
                                          f"events to {e['carried']}"))
        if seen < e["delivered"]:
            differences.append(Difference(customer, tenants, "missing_in_stripe",
                                          e["delivered"] - seen,
                                          f"delivered {e['delivered']} {metric}, Stripe "
                                          f"has {seen}: {e['delivered'] - seen} missing"))
        elif seen > e["delivered"]:
            differences.append(Difference(customer, tenants, "extra_in_stripe",
                                          seen - e["delivered"],
                                          f"delivered {e['delivered']} {metric}, Stripe "
                                          f"has {seen}: {seen - e['delivered']} extra"))
    return Reconciliation(rows, differences, notes)


def cmd_reconcile(args: argparse.Namespace) -> int:
    """``ai-saas billing reconcile --period YYYY-MM``: 0 when the ledger and Stripe agree,
    1 when they differ (each difference listed), 2 when they cannot be compared."""
    import sys

    from ..config import load_config

    config = load_config(args.config)
    if config.billing.stripe is None:
        print("ai-saas: billing reconcile: no billing.stripe section in the configuration: "
              "nothing is sent to Stripe, so there is nothing to reconcile", file=sys.stderr)
        return 2
    try:
        ledger = Ledger(args.database or config.billing.database)
    except LedgerError as exc:
        print(f"ai-saas: billing reconcile: {exc}", file=sys.stderr)
        return 2
    # Redis-stored tenants' customers too (tenants.py), as the worker delivers to them.
    store = RedisStore(config.redis, args.redis_url or config.redis.url
                       or os.environ.get("REDIS_URL"))
    try:
        ledger.check_version()
        meter = StripeMeter(config.billing.stripe, backoff_cap_s=5.0)
        found = reconcile(ledger, meter, config.billing.usage_metric, args.period,
                          customers_of(config, store))
    except StripeUnavailable as exc:
        print(f"ai-saas: billing reconcile: {exc}", file=sys.stderr)
        return 2
    except StripeRefused as exc:
        print(f"ai-saas: billing reconcile: Stripe refused: {exc.reason}", file=sys.stderr)
        return 2
    except LedgerError as exc:  # e.g. not migrated: "run 'ai-saas billing migrate'"
        print(f"ai-saas: billing reconcile: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:  # the ledger's driver errors: a message, no traceback
        print(f"ai-saas: billing reconcile: the ledger {ledger.url} cannot be read: "
              f"{getattr(exc, 'orig', None) or exc}", file=sys.stderr)
        return 2
    finally:
        ledger.close()
        store.close()
    metric = config.billing.usage_metric
    print(f"ledger {ledger.url} against Stripe (event {config.billing.stripe.event_name}), "
          f"{args.period}, in {metric}:")
    print(table([("customer", "tenants", "ledger", "delivered", "stripe")]
                + [(r.customer, ",".join(r.tenants), str(r.ledger), str(r.delivered),
                    str(r.stripe)) for r in found.rows], right=(2, 3, 4)))
    for note in found.notes:
        print(f"note: {note}")
    if not found.differences:
        print("no differences.")
        return 0
    print(f"{len(found.differences)} difference(s):")
    for diff in found.differences:
        print(f"  {diff}")
    return 1
