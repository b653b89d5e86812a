"""``ai-saas report``: margins, LTV/CAC and usage per tenant for one month, from the ledger.

:func:`build_report` reads the ``usage_daily`` aggregates of the period (one grouped
query; ``usage_events`` is not read) and works out, per tenant, in exact decimals
(:data:`~ai_saas_middleware.pricing.MONEY`):

- ``cost`` (inference), ``revenue``, ``gross_profit`` = revenue - cost, and
  ``margin`` = gross_profit / revenue (a fraction; none when revenue is 0);
- ``saved`` (inference cost the cache saved) and ``cache_hits``;
- ``top_models``: the three dearest models of the month (by cost, then id);
- ``outcome_value`` (the sum of the ``outcome_value`` the app reported) and
  ``cost_per_outcome`` = cost / outcome_value (none when no positive outcome);
- ``ltv`` = gross_profit / monthly churn (inference cost included, since gross profit
  is after it), ``cac`` and ``ltv_cac`` = ltv / cac;
- ``flags``: ``ltv_cac_below_3`` (LTV/CAC under 3:1) and ``negative_margin``
  (gross profit below 0, which includes revenue 0 with a cost).

Ratios (``margin``, ``churn``, ``ltv_cac``) are rounded half-even to 6 decimal places,
``ltv`` and ``cost_per_outcome`` to 12 (a picodollar); every other figure is exact.

Assumptions, each printed with the report:

- **CAC**: the ``--cac-file`` CSV (``tenant_id,cac``), else ``tenants[].cac``, else
  ``billing.cac``; a tenant with none (or a CAC of 0) has no LTV/CAC, and is not flagged.
- **Churn** (one monthly figure for every tenant): ``billing.monthlyChurn``, else
  observed: the share of the tenants with usage in the previous month that have none in
  this one. When no tenant had usage in the previous month, or none of them left,
  observed churn says nothing about lifetime (0 would make every LTV unbounded), so
  :data:`DEFAULT_MONTHLY_CHURN` is used, and said. A configured churn of 0 is taken at
  its word: LTV is then unbounded and not given.
- **Monthly gross profit** is the period's own (a month still running is partial).

Where it is printed: ``--format table`` puts the assumptions above the table on stdout;
``csv`` and ``json`` keep stdout to the data (JSON: a list of per-tenant objects, money
as decimal strings) and put them on stderr, each line starting with ``#``.

Exit status: 0; 3 with ``--fail-below R`` when some tenant's LTV/CAC is below ``R``
(they are listed on stderr); 1 for an unknown tenant or a ledger that cannot be read;
2 for a bad ``--cac-file``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, TextIO

from sqlalchemy import Connection, func, select
from sqlalchemy.exc import SQLAlchemyError

from ..budgets import from_picodollars
from ..config import MAX_BUDGET_USD, MONEY_PLACES, Config, decimal_places
from ..errors import AISaaSError, UnknownTenant
from ..pricing import MONEY, format_usd
from ..tabulate import table
from . import tables as t
from .ledger import Ledger

__all__ = ["DEFAULT_MONTHLY_CHURN", "LTV_CAC_TARGET", "CacFileError", "ModelCost", "Report",
           "TenantReport", "build_report", "cmd_report", "previous_period", "read_cac_file"]

LTV_CAC_TARGET = Decimal(3)
"""A tenant whose LTV/CAC is below this is flagged ``ltv_cac_below_3``."""

DEFAULT_MONTHLY_CHURN = Decimal("0.05")
"""The churn used when neither ``billing.monthlyChurn`` nor an observation gives one."""

TOP_MODELS = 3
PROGRESS_MIN_TENANTS = 100  # a report of fewer tenants is quick: no bar
FIELDS = ("tenant_id", "requests", "errors", "prompt_tokens", "completion_tokens", "cost",
          "revenue", "gross_profit", "margin", "saved", "cache_hits", "top_models",
          "outcome_value", "outcomes", "cost_per_outcome", "churn", "ltv", "cac", "cac_source",
          "ltv_cac", "flags")
_RATIO = Decimal("1e-6")
_PICO = Decimal("1e-12")


class CacFileError(AISaaSError):
    """The ``--cac-file`` cannot be read or is not a CSV of ``tenant_id,cac``."""


@dataclass(frozen=True, slots=True)
class ModelCost:
    """One of a tenant's top models of the month."""

    model_id: str
    requests: int
    cost: Decimal


@dataclass(frozen=True, slots=True)
class TenantReport:
    """One tenant's month (see the module docstring for each figure)."""

    tenant_id: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal
    revenue: Decimal
    gross_profit: Decimal
    margin: Decimal | None
    saved: Decimal
    cache_hits: int
    top_models: tuple[ModelCost, ...]
    outcome_value: Decimal
    outcomes: int
    cost_per_outcome: Decimal | None
    churn: Decimal
    ltv: Decimal | None
    cac: Decimal | None
    cac_source: str | None  # "--cac-file", "tenants[].cac", "billing.cac" or None
    ltv_cac: Decimal | None
    flags: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        """The tenant as a JSON object: money and ratios as decimal strings."""
        return {
            "tenant_id": self.tenant_id, "requests": self.requests, "errors": self.errors,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "cost": _text(self.cost), "revenue": _text(self.revenue),
            "gross_profit": _text(self.gross_profit), "margin": _text(self.margin),
            "saved": _text(self.saved), "cache_hits": self.cache_hits,
            "top_models": [{"model_id": m.model_id, "requests": m.requests,
                            "cost": _text(m.cost)} for m in self.top_models],
            "outcome_value": _text(self.outcome_value), "outcomes": self.outcomes,
            "cost_per_outcome": _text(self.cost_per_outcome), "churn": _text(self.churn),
            "ltv": _text(self.ltv), "cac": _text(self.cac), "cac_source": self.cac_source,
            "ltv_cac": _text(self.ltv_cac), "flags": list(self.flags),
        }


@dataclass(frozen=True, slots=True)
class Report:
    """A month's report: the tenants (by id) and every assumption behind the figures."""

    period: str
    tenants: tuple[TenantReport, ...]
    churn: Decimal
    churn_source: str  # "billing.monthlyChurn", "observed" or "default"
    assumptions: tuple[str, ...] = field(default=())

    def below(self, ratio: Decimal) -> list[TenantReport]:
        """The tenants whose LTV/CAC is known and below ``ratio``."""
        return [r for r in self.tenants if r.ltv_cac is not None and r.ltv_cac < ratio]


def _text(value: Decimal | None) -> str | None:
    return None if value is None else format_usd(value)


def previous_period(period: str) -> str:
    """The month before ``period`` (``YYYY-MM``)."""
    year, month = int(period[:4]), int(period[5:7])
    return f"{year - 1}-12" if month == 1 else f"{year}-{month - 1:02d}"


def read_cac_file(path: str) -> dict[str, Decimal]:
    """``tenant_id -> cac`` (USD) from a CSV of two columns; a first row of
    ``tenant_id,cac`` is a header. Each CAC is bounded as ``billing.cac`` is (0 to
    9,000,000, at most 12 decimal places). Raises :class:`CacFileError` naming the line."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise CacFileError(f"--cac-file {path}: {exc}") from None
    except csv.Error as exc:
        raise CacFileError(f"--cac-file {path}: not a CSV file ({exc})") from None
    found: dict[str, Decimal] = {}
    for number, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if number == 1 and [c.lower() for c in cells] == ["tenant_id", "cac"]:
            continue
        if len(cells) != 2 or not cells[0]:
            raise CacFileError(f"--cac-file {path}:{number}: expected tenant_id,cac, found "
                               f"{','.join(cells)[:80]!r}")
        try:
            cac = Decimal(cells[1])
        except InvalidOperation:
            cac = Decimal("NaN")
        if not cac.is_finite() or cac < 0:
            raise CacFileError(f"--cac-file {path}:{number}: expected a CAC in USD of at "
                               f"least 0, found {cells[1][:40]!r}")
        # The bounds of billing.cac: finer than a picodollar, LTV/CAC would need more
        # digits than MONEY works in (an InvalidOperation, not a report).
        if decimal_places(cac) > MONEY_PLACES:
            raise CacFileError(f"--cac-file {path}:{number}: expected a CAC in USD with at "
                               f"most {MONEY_PLACES} decimal places, found {cells[1][:40]!r}")
        if cac > MAX_BUDGET_USD:
            raise CacFileError(f"--cac-file {path}:{number}: expected a CAC in USD of at "
                               f"most {MAX_BUDGET_USD}, found {cells[1][:40]!r}")
        if cells[0] in found:
            raise CacFileError(f"--cac-file {path}:{number}: tenant {cells[0]!r} appears "
                               "twice")
        found[cells[0]] = cac
    return found


@dataclass(slots=True)
class _Sums:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_p: int = 0
    revenue_p: int = 0
    cache_hits: int = 0
    saved_p: int = 0
    outcome_p: int = 0
    outcomes: int = 0
    models: list[tuple[int, str, int]] = field(default_factory=list)  # (cost_p, id, requests)


def _observed_churn(conn: Connection, period: str) -> tuple[Decimal, str, str]:
    """(churn, source, the sentence that says how it was found) over every tenant."""
    d = t.usage_daily.c
    before = previous_period(period)
    rows = conn.execute(select(d.period, d.tenant_id).distinct()
                        .where(d.period.in_([before, period]))).all()
    earlier = {r.tenant_id for r in rows if r.period == before}
    now = {r.tenant_id for r in rows if r.period == period}
    if not earlier:
        return (DEFAULT_MONTHLY_CHURN, "default",
                f"churn {format_usd(DEFAULT_MONTHLY_CHURN)} a month: assumed (no tenant had "
                f"usage in {before}, so none can be observed; set billing.monthlyChurn)")
    left = len(earlier - now)
    if left == 0:
        return (DEFAULT_MONTHLY_CHURN, "default",
                f"churn {format_usd(DEFAULT_MONTHLY_CHURN)} a month: assumed (all "
                f"{len(earlier)} tenants with usage in {before} have usage in {period}: an "
                "observed 0 would make every LTV unbounded; set billing.monthlyChurn)")
    churn = MONEY.divide(Decimal(left), Decimal(len(earlier))).quantize(_RATIO, context=MONEY)
    return (churn, "observed",
            f"churn {format_usd(churn)} a month: observed ({left} of the {len(earlier)} "
            f"tenants with usage in {before} have none in {period})")


def _known_tenant(conn: Connection, config: Config, tenant_id: str) -> bool:
    if tenant_id in config.tenants:
        return True
    d = t.usage_daily.c
    return conn.execute(select(d.tenant_id).where(d.tenant_id == tenant_id).limit(1)
                        ).first() is not None


def _rows(conn: Connection, period: str, tenant_id: str | None) -> Iterator[Any]:
    d = t.usage_daily.c
    query = (select(d.tenant_id, d.model_id, func.sum(d.requests), func.sum(d.errors),
                    func.sum(d.prompt_tokens), func.sum(d.completion_tokens),
                    func.sum(d.cost_p), func.sum(d.revenue_p), func.sum(d.cache_hits),
                    func.sum(d.saved_p), func.sum(d.outcome_p), func.sum(d.outcomes))
             .where(d.period == period)
             .group_by(d.tenant_id, d.model_id).order_by(d.tenant_id, d.model_id))
    if tenant_id is not None:
        query = query.where(d.tenant_id == tenant_id)
    yield from conn.execute(query)


def _count_tenants(conn: Connection, period: str, tenant_id: str | None) -> int:
    d = t.usage_daily.c
    query = select(func.count(d.tenant_id.distinct())).where(d.period == period)
    if tenant_id is not None:
        query = query.where(d.tenant_id == tenant_id)
    return int(conn.execute(query).scalar() or 0)


def _ratio(numerator: Decimal, denominator: Decimal, exp: Decimal) -> Decimal:
    return MONEY.divide(numerator, denominator).quantize(exp, context=MONEY)


def _tenant(tenant_id: str, s: _Sums, churn: Decimal, cac: Decimal | None,
            cac_source: str | None) -> TenantReport:
    cost, revenue = from_picodollars(s.cost_p), from_picodollars(s.revenue_p)
    gross_profit = MONEY.subtract(revenue, cost)
    margin = _ratio(gross_profit, revenue, _RATIO) if s.revenue_p else None
    outcome = from_picodollars(s.outcome_p)
    per_outcome = _ratio(cost, outcome, _PICO) if s.outcome_p > 0 else None
    ltv = _ratio(gross_profit, churn, _PICO) if churn > 0 else None
    ltv_cac = _ratio(ltv, cac, _RATIO) if ltv is not None and cac else None
    flags = []
    if ltv_cac is not None and ltv_cac < LTV_CAC_TARGET:
        flags.append("ltv_cac_below_3")
    if gross_profit < 0:
        flags.append("negative_margin")
    top = sorted(s.models, key=lambda m: (-m[0], m[1]))[:TOP_MODELS]
    return TenantReport(
        tenant_id=tenant_id, requests=s.requests, errors=s.errors,
        prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens, cost=cost,
        revenue=revenue, gross_profit=gross_profit, margin=margin,
        saved=from_picodollars(s.saved_p), cache_hits=s.cache_hits,
        top_models=tuple(ModelCost(m[1], m[2], from_picodollars(m[0])) for m in top),
        outcome_value=outcome, outcomes=s.outcomes, cost_per_outcome=per_outcome,
        churn=churn, ltv=ltv, cac=cac, cac_source=cac_source, ltv_cac=ltv_cac,
        flags=tuple(flags))


class Progress:
    """A one-line progress bar on ``stream`` when it is a terminal, else nothing."""

    WIDTH = 30

    def __init__(self, stream: TextIO, total: int, label: str):
        self.stream, self.total, self.label = stream, total, label
        isatty = getattr(stream, "isatty", None)
        self.shown = bool(total >= PROGRESS_MIN_TENANTS and isatty is not None and isatty())
        self._drawn = -1

    def update(self, done: int) -> None:
        if not self.shown:
            return
        step = done * self.WIDTH // max(self.total, 1)
        if step == self._drawn and done != self.total:
            return  # redraw only when the bar grows: a terminal write per tenant is slow
        self._drawn = step
        bar = "#" * step + "." * (self.WIDTH - step)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} tenants")
        self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")  # erase the bar: the report follows on stdout
            self.stream.flush()


def build_report(ledger: Ledger, config: Config, period: str, *, tenant_id: str | None = None,
                 cac_file: Mapping[str, Decimal] | None = None,
                 progress: TextIO | None = None) -> Report:
    """The report of ``period`` (``YYYY-MM``) for every tenant with usage in it, or for
    ``tenant_id`` alone (a tenant of the configuration or the ledger: with no usage in
    the period, a row of zeros). ``cac_file``: CACs that override the configuration's.
    ``progress``: a stream for a progress bar (drawn only when it is a terminal).

    Raises :class:`~ai_saas_middleware.errors.UnknownTenant` when ``tenant_id`` is in
    neither the configuration nor the ledger, and
    :class:`~ai_saas_middleware.billing.ledger.LedgerError` when the ledger's schema is
    not this package's (``ai-saas billing migrate``)."""
    ledger.check_version()
    cac_file = dict(cac_file or {})
    assumptions: list[str] = []
    with ledger.reading() as conn:
        if tenant_id is not None and not _known_tenant(conn, config, tenant_id):
            raise UnknownTenant(f"unknown tenant {tenant_id!r}: not in the configuration's "
                                "tenants and no usage of it in the ledger")
        if config.billing.monthly_churn is not None:
            churn, source = config.billing.monthly_churn, "billing.monthlyChurn"
            assumptions.append(f"churn {format_usd(churn)} a month: billing.monthlyChurn"
                               + (" (0: LTV is unbounded and not given)" if churn == 0
                                  else ""))
        else:
            churn, source, sentence = _observed_churn(conn, period)
            assumptions.append(sentence)
        bar = Progress(progress or io.StringIO(), _count_tenants(conn, period, tenant_id),
                       f"report {period}")
        sums: dict[str, _Sums] = {}
        try:
            for row in _rows(conn, period, tenant_id):
                (tenant, model, requests, errors, prompt, completion, cost, revenue, hits,
                 saved, outcome, outcomes) = (row[0], row[1], *(int(v or 0) for v in row[2:]))
                s = sums.get(tenant)
                if s is None:
                    s = sums[tenant] = _Sums()
                    bar.update(len(sums) - 1)
                s.requests += requests
                s.errors += errors
                s.prompt_tokens += prompt
                s.completion_tokens += completion
                s.cost_p += cost
                s.revenue_p += revenue
                s.cache_hits += hits
                s.saved_p += saved
                s.outcome_p += outcome
                s.outcomes += outcomes
                s.models.append((cost, model, requests))
            bar.update(len(sums))
        finally:
            bar.close()
    if tenant_id is not None and tenant_id not in sums:
        sums[tenant_id] = _Sums()
    assumptions.append("LTV = the month's gross profit (revenue - inference cost) / churn")
    if cac_file:
        assumptions.append(f"CAC: --cac-file ({len(cac_file)} tenants), else tenants[].cac, "
                           "else billing.cac")
    else:
        assumptions.append("CAC: tenants[].cac, else billing.cac"
                           + (f" ({format_usd(config.billing.cac)})"
                              if config.billing.cac is not None else " (not set)"))
    tenants: list[TenantReport] = []
    no_cac: list[str] = []
    for tenant in sorted(sums):
        cac, cac_source = _cac_of(tenant, config, cac_file)
        if cac is None or cac == 0:
            no_cac.append(tenant)
        tenants.append(_tenant(tenant, sums[tenant], churn, cac, cac_source))
    if no_cac:
        shown = ", ".join(no_cac[:10]) + (f" and {len(no_cac) - 10} more"
                                          if len(no_cac) > 10 else "")
        assumptions.append(f"no LTV/CAC (no CAC, or a CAC of 0) for {shown}")
    return Report(period, tuple(tenants), churn, source, tuple(assumptions))


def _cac_of(tenant: str, config: Config, cac_file: Mapping[str, Decimal]
            ) -> tuple[Decimal | None, str | None]:
    if tenant in cac_file:
        return cac_file[tenant], "--cac-file"
    own = config.tenants.get(tenant)
    if own is not None and own.cac is not None:
        return own.cac, "tenants[].cac"
    if config.billing.cac is not None:
        return config.billing.cac, "billing.cac"
    return None, None


# -- output

def _percent(value: Decimal | None) -> str:
    if value is None:
        return "-"
    return f"{MONEY.multiply(value, Decimal(100)).quantize(Decimal('0.01'), context=MONEY)}%"


def _cell(value: Decimal | None) -> str:
    return "-" if value is None else format_usd(value)


def format_table(report: Report) -> str:
    """The report as a text table, its assumptions above it."""
    lines = [f"report {report.period}: {len(report.tenants)} tenants"]
    lines += [f"  assumption: {a}" for a in report.assumptions]
    if not report.tenants:
        lines.append(f"no usage in {report.period}.")
        return "\n".join(lines)
    rows = [["tenant", "requests", "tokens_in", "tokens_out", "cost", "revenue", "margin",
             "saved", "hits", "outcome", "cost/outcome", "ltv", "cac", "ltv/cac",
             "top_models", "flags"]]
    for r in report.tenants:
        rows.append([r.tenant_id, str(r.requests), str(r.prompt_tokens),
                     str(r.completion_tokens), format_usd(r.cost), format_usd(r.revenue),
                     _percent(r.margin), format_usd(r.saved), str(r.cache_hits),
                     format_usd(r.outcome_value), _cell(r.cost_per_outcome), _cell(r.ltv),
                     _cell(r.cac), _cell(r.ltv_cac),
                     ",".join(m.model_id for m in r.top_models) or "-",
                     ",".join(r.flags) or "-"])
    lines.append(table(rows))
    return "\n".join(lines)


def format_csv(report: Report) -> str:
    """The report as CSV: a header row of :data:`FIELDS`, a row per tenant (empty cells
    where a figure is not defined; top models and flags joined with ``;``)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FIELDS)
    for r in report.tenants:
        obj = r.as_json()
        obj["top_models"] = ";".join(m.model_id for m in r.top_models)
        obj["flags"] = ";".join(r.flags)
        writer.writerow(["" if obj[name] is None else obj[name] for name in FIELDS])
    return out.getvalue()


def format_json(report: Report) -> str:
    """The report as a JSON list of per-tenant objects (:meth:`TenantReport.as_json`)."""
    return json.dumps([r.as_json() for r in report.tenants], indent=2)


def _emit(lines: Iterable[str], stream: TextIO) -> None:
    for line in lines:
        print(line, file=stream)


def cmd_report(args: argparse.Namespace) -> int:
    """``ai-saas report``: print the report of ``--period``; exit 3 with ``--fail-below``
    when some tenant is below it."""
    from ..config import load_config
    from .ledger import LedgerError

    config = load_config(args.config)
    try:
        cac_file = read_cac_file(args.cac_file) if args.cac_file else None
    except CacFileError as exc:  # a bad argument: exit 2, as argparse's own errors
        print(f"ai-saas: {exc}", file=sys.stderr)
        return 2
    ledger = Ledger(args.database or config.billing.database)
    try:
        report = build_report(ledger, config, args.period, tenant_id=args.tenant,
                              cac_file=cac_file, progress=sys.stderr)
    except SQLAlchemyError as exc:
        raise LedgerError(f"the ledger {ledger.url} cannot be read: "
                          f"{getattr(exc, 'orig', None) or exc}") from None
    finally:
        ledger.close()
    if args.format == "table":
        print(format_table(report))
    else:
        _emit((f"# assumption: {a}" for a in report.assumptions), sys.stderr)
        sys.stdout.write(format_csv(report) if args.format == "csv"
                         else format_json(report) + "\n")
    if args.fail_below is not None:
        below = report.below(args.fail_below)
        if below:
            print(f"ai-saas: {len(below)} tenants below LTV/CAC {format_usd(args.fail_below)}"
                  f" in {report.period}: " + ", ".join(
                      f"{r.tenant_id} ({_cell(r.ltv_cac)})" for r in below), file=sys.stderr)
            return 3
    return 0
