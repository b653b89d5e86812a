"""Usage read back from the streams, summed per tenant (``ai-saas usage``, the demo).

The billing worker (consumer groups, Stripe) is a later piece; this reads the streams
directly with XRANGE, for small deployments, the demo and checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from .pricing import MONEY, format_usd
from .store.keys import KeySchema
from .store.redis import RedisStore

__all__ = ["TenantUsage", "format_table", "read_events", "summarize", "usage_events"]


def usage_events(store: RedisStore, keys: KeySchema, ledger_url: str | None, *,
                 tenant_id: str | None = None, month: str | None = None
                 ) -> Iterator[dict[str, str]]:
    """Every usage event once: the billing ledger's (when there is one: the worker trims
    what it has moved there from the streams), then the streams' not in it yet."""
    seen: set[str] = set()
    if ledger_url is not None:
        try:
            from .billing.readback import ledger_events
        except ImportError:  # no billing extra: no ledger either
            pass
        else:
            for event in ledger_events(ledger_url, tenant_id=tenant_id, month=month):
                seen.add(event["request_id"])
                yield event
    for event in read_events(store, keys, tenant_id=tenant_id, month=month):
        if event.get("request_id") not in seen:
            yield event


def read_events(store: RedisStore, keys: KeySchema, *, tenant_id: str | None = None,
                month: str | None = None, batch: int = 1000) -> Iterator[dict[str, str]]:
    """Every usage event (as str fields), shard by shard, optionally for one tenant/month."""
    streams = [keys.tenant(tenant_id).stream] if tenant_id else keys.streams()
    for stream in streams:
        start = "-"
        while True:
            entries = store.call("XRANGE", stream, start, "+", "COUNT", batch)
            if not entries:
                break
            for _entry_id, raw in entries:
                pairs = zip(raw[::2], raw[1::2], strict=True) if isinstance(raw, list) \
                    else raw.items()
                fields = {k.decode(): v.decode() for k, v in pairs}
                if tenant_id and fields.get("tenant_id") != tenant_id:
                    continue
                if month and not fields.get("ts", "").startswith(month):
                    continue
                yield fields
            last = entries[-1][0].decode()
            ms, seq = last.split("-")
            start = f"{ms}-{int(seq) + 1}"


@dataclass
class TenantUsage:
    tenant_id: str
    tier: str = ""
    requests: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: int = 0
    cost: Decimal = Decimal(0)
    models: dict[str, int] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def summarize(events: Iterable[Mapping[str, str]]) -> dict[str, TenantUsage]:
    """Per tenant: requests, tokens, exact cost, and requests per model."""
    out: dict[str, TenantUsage] = {}
    for event in events:
        tenant = event["tenant_id"]
        row = out.get(tenant)
        if row is None:
            row = out[tenant] = TenantUsage(tenant)
        row.tier = event.get("tier", row.tier)
        row.requests += 1
        if int(event.get("status", "200")) >= 400:
            row.failed += 1
        row.prompt_tokens += int(event["prompt_tokens"])
        row.completion_tokens += int(event["completion_tokens"])
        row.estimated += event.get("usage_source") == "estimate"
        row.cost = MONEY.add(row.cost, Decimal(event["cost"]))
        model = event["model_id"]
        row.models[model] = row.models.get(model, 0) + 1
    return out


def format_table(rows: Mapping[str, TenantUsage], refused: Mapping[str, int] | None = None
                 ) -> str:
    """A plain-text table; ``refused`` adds a column of refusals per tenant."""
    head = ["tenant", "tier", "requests"] + (["refused"] if refused is not None else []) + \
        ["tokens", "cost (USD)", "models"]
    lines = [head]
    total_cost = Decimal(0)
    for tenant in sorted(set(rows) | set(refused or {})):
        row = rows.get(tenant, TenantUsage(tenant))
        total_cost = MONEY.add(total_cost, row.cost)
        models = ", ".join(f"{m} x{n}" for m, n in sorted(row.models.items()))
        line = [tenant, row.tier or "-", str(row.requests)]
        if refused is not None:
            line.append(str(refused.get(tenant, 0)))
        line += [f"{row.tokens:,}", format_usd(row.cost), models or "-"]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    text.append(f"total cost: ${format_usd(total_cost)}")
    return "\n".join(text)
