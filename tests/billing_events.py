"""Usage events for the billing tests, written the way the middleware writes them: through
the real settle.lua (the quota counter, the settled marker and the stream entry of each
request, atomically), in pipelines so that 100,000 take seconds.

Each event's figures derive from its index, so a test knows the exact totals it expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

import redis

from ai_saas_middleware.pricing import format_usd
from ai_saas_middleware.store.keys import KeySchema, reservation_member
from ai_saas_middleware.store.redis import load_script

PRICE_IN = Decimal("0.0000025")
PRICE_OUT = Decimal("0.00001")
MONTH = "2026-11"


@dataclass
class Expected:
    """What the events of a run add up to, per tenant."""

    requests: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    cost: dict[str, Decimal] = field(default_factory=dict)
    ids: set[str] = field(default_factory=set)

    def add(self, tenant: str, request_id: str, prompt: int, completion: int, cost: Decimal
            ) -> None:
        self.requests[tenant] = self.requests.get(tenant, 0) + 1
        self.tokens[tenant] = self.tokens.get(tenant, 0) + prompt + completion
        self.cost[tenant] = self.cost.get(tenant, Decimal(0)) + cost
        self.ids.add(request_id)


def event_fields(i: int, tenant: str, run: str, days: int = 28
                 ) -> tuple[str, int, int, Decimal, list[str]]:
    """Event ``i``'s id, tokens, cost and fields; its day is one of the month's first
    ``days`` (a live stream's events are of one day; a month's, of many)."""
    prompt, completion = 10 + i % 97, 1 + i % 31
    cost = PRICE_IN * prompt + PRICE_OUT * completion
    request_id = f"{run}-{i:07d}"
    day = 1 + i % days
    fields = ["request_id", request_id, "tenant_id", tenant, "tier", "pro",
              "model_id", "model-large", "provider", "openai",
              "prompt_tokens", str(prompt), "completion_tokens", str(completion),
              "usage_source", "provider", "cost", format_usd(cost), "latency_ms", "12",
              "status", "200", "cache", "miss", "fallback_from", "", "outcome_value", "",
              "ts", f"{MONTH}-{day:02d}T12:00:00.000Z", "endpoint", "/ai/*",
              "client_disconnected", "false", "price_version", "0", "truncated", "false"]
    return request_id, prompt, completion, cost, fields


def tenants(n: int) -> list[str]:
    return [f"tenant-{k:03d}" for k in range(n)]


def settle_events(client: redis.Redis, keys: KeySchema, start: int, count: int,
                  tenant_ids: list[str], expected: Expected, run: str = "r",
                  chunk: int = 2000, days: int = 28) -> None:
    """Settle events ``start .. start+count-1`` (tenant ``i mod len(tenant_ids)``)."""
    sha = client.script_load(load_script("settle"))
    for lo in range(start, start + count, chunk):
        pipe = client.pipeline(transaction=False)
        for i in range(lo, min(lo + chunk, start + count)):
            tenant = tenant_ids[i % len(tenant_ids)]
            request_id, prompt, completion, cost, fields = event_fields(i, tenant, run, days)
            tk = keys.tenant(tenant)
            member = reservation_member(request_id, prompt + completion, MONTH)
            pipe.evalsha(sha, 4, tk.quota(MONTH), tk.stream, tk.settled(request_id),
                         tk.reservations, prompt + completion, 86400, 62 * 86400, member,
                         *fields)
            expected.add(tenant, request_id, prompt, completion, cost)
        pipe.execute()

