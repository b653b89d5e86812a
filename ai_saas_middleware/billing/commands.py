"""The billing subcommands of ``ai-saas``: ``worker``, ``report``, ``billing ...``.

Only argument definitions and dispatch live here; each command's work is in its own
module (:mod:`.worker`, :mod:`.reports`, :mod:`.audit`, :mod:`.stripe_reconcile`,
:mod:`.reprice`). Every handler takes the parsed arguments and returns the exit status.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = ["add_commands"]

Command = Callable[..., argparse.ArgumentParser]


def _ledger(args: argparse.Namespace) -> Any:
    from ..config import load_config
    from .ledger import Ledger

    config = load_config(args.config)
    return config, Ledger(args.database or config.billing.database)


def _ratio(text: str) -> Decimal:
    # A decimal, not a float: compared exactly with the report's decimal LTV/CAC.
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite():
        raise argparse.ArgumentTypeError(f"expected a ratio, a decimal number (e.g. 3), "
                                         f"found {text!r}")
    return value


def _migrate(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from .ledger import LedgerError

    _, ledger = _ledger(args)
    try:
        before, after = ledger.migrate()
    except SQLAlchemyError as exc:  # the ledger's driver errors: a message, no traceback
        raise LedgerError(f"the ledger {ledger.url} cannot be migrated: "
                          f"{getattr(exc, 'orig', None) or exc}") from None
    finally:
        ledger.close()
    if before == after:
        print(f"ledger {ledger.url}: at schema version {after}, nothing to do.")
    else:
        print(f"ledger {ledger.url}: schema version {before} -> {after}.")
    return 0


def _handler(module: str) -> Callable[[argparse.Namespace], int]:
    """The ``cmd_*`` of ``.module``, imported when the command runs: a deployment without
    the billing extra gets a one-line hint, not an ``ImportError`` traceback."""

    def run(args: argparse.Namespace) -> int:
        from ..errors import AISaaSError

        try:
            found = importlib.import_module(f".{module}", __package__)
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").split(".")[0]
            if missing not in _EXTRA:
                raise
            raise AISaaSError(f"'{args.command}' needs {missing}: pip install "
                              f"'ai-saas-middleware[{_EXTRA[missing]}]'") from None
        if module == "ledger":  # migrate: the ledger's own (imported above, so checked)
            return _migrate(args)
        handler = getattr(found, "cmd_" + (args.action if args.command == "billing"
                                           else args.command))
        return int(handler(args))

    return run


_EXTRA = {"sqlalchemy": "billing", "stripe": "billing"}
cmd_migrate = _handler("ledger")
cmd_worker = _handler("worker")
cmd_report = _handler("reports")
cmd_reconcile = _handler("stripe_reconcile")
cmd_audit = _handler("audit")
cmd_reprice = _handler("reprice")


def add_commands(sub: Any, command: Command, with_config: Callable[..., None],
                 month: Callable[[str], str]) -> None:
    """Add ``worker``, ``report`` and ``billing`` to the ``ai-saas`` parser ``sub``."""

    def with_ledger(p: argparse.ArgumentParser, *, redis: bool = False,
                    period: str | None = None) -> None:
        # Every command here reads the configuration and the ledger; those of one month
        # also take --period ("the month to <period>").
        with_config(p, redis=redis)
        p.add_argument("--database", default=None, metavar="URL",
                       help="the ledger's SQLAlchemy URL (default: billing.database)")
        if period is not None:
            p.add_argument("--period", required=True, type=month, metavar="YYYY-MM",
                           help=f"the month to {period}")

    p = command(sub, "worker", "move usage events from the Redis streams into the ledger",
                "Reads every shard's stream in a consumer group, commits each batch to the "
                "ledger (billing.database) in one transaction and acknowledges it only "
                "then; takes over the pending entries of a worker that died; trims what "
                "every group has acknowledged; sends usage to Stripe when billing.stripe "
                "is set. Runs until SIGTERM or SIGINT, then finishes its batch and exits 0. "
                "Several workers may run at once.")
    with_ledger(p, redis=True)
    p.add_argument("--status", action="store_true",
                   help="print each shard's pending entries, lag and last event time, and "
                        "each consumer, then exit")
    p.add_argument("--name", default=None, metavar="NAME",
                   help="this worker's consumer name (default: host-pid-random)")
    p.add_argument("--once", action="store_true",
                   help="stop when the streams hold nothing new or pending (for cron, tests)")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="--status output format (default: table)")
    p.set_defaults(func=cmd_worker)

    p = command(sub, "report", "margins, LTV/CAC and usage per tenant for one month",
                "From the ledger: per tenant requests, tokens, inference cost, revenue, "
                "gross margin, cache savings, top models, outcome value and cost per unit "
                "of it, LTV/CAC with inference cost included (every assumption printed); "
                "tenants below 3:1 or with a negative margin are flagged.")
    with_ledger(p, period="report")
    p.add_argument("--tenant", default=None, metavar="T", help="one tenant only")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table",
                   help="output format (default: table); money in JSON is a decimal string")
    p.add_argument("--cac-file", default=None, metavar="CSV",
                   help="a CSV of tenant_id,cac (USD) overriding billing.cac and tenants' cac")
    p.add_argument("--fail-below", type=_ratio, default=None, metavar="RATIO",
                   help="exit 3 when some tenant's LTV/CAC is below RATIO (e.g. 3), listing "
                        "them on stderr")
    p.set_defaults(func=cmd_report)

    p = command(sub, "billing", "the ledger: migrate, reconcile with Stripe, audit, reprice")
    bsub = p.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")

    a = command(bsub, "migrate", "create or upgrade the ledger's schema (versioned)")
    with_ledger(a)
    a.set_defaults(func=cmd_migrate)

    a = command(bsub, "reconcile", "compare the ledger with Stripe's meter event summaries",
                "Lists every tenant whose usage delivered to Stripe for the month differs "
                "from the ledger's, and every delivery not yet confirmed; exits 1 when "
                "there is a difference.")
    with_ledger(a, redis=True, period="reconcile")
    a.set_defaults(func=cmd_reconcile)

    a = command(bsub, "audit", "prove every event is in the spool, a stream or the ledger",
                "Per tenant, side by side: tokens on the quota counter, reserved in flight, "
                "in the local spool, in the streams and not yet in the ledger, and in the "
                "ledger; exits 1 when they do not add up.")
    with_ledger(a, redis=True, period="audit")
    a.add_argument("--format", choices=("table", "json"), default="table",
                   help="output format (default: table)")
    a.set_defaults(func=cmd_audit)

    a = command(bsub, "reprice", "price a month's events again with today's pricing rules",
                "Explicit and logged (billing_log): each event gets the revenue the "
                "current billing.pricingRules / markup / minimum give it and their version; "
                "the daily aggregates are rebuilt; prints the revenue before and after.")
    with_ledger(a, period="price again")
    a.add_argument("--dry-run", action="store_true", help="print the change, write nothing")
    a.set_defaults(func=cmd_reprice)
