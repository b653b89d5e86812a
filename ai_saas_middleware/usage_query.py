"""The usage endpoint: a caller's own usage this month, read by one usage.lua call.

Credentials are checked as for admission (:mod:`~ai_saas_middleware.credentials`); the
reply becomes a JSON :class:`~ai_saas_middleware.types.Decision`. No I/O: the gateway
twins run the call.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .admission import WINDOW_MS, ScriptCall, _this_month
from .config import Config
from .credentials import Caller, Credentials
from .responses import refusal
from .store.keys import KeySchema
from .types import Decision, RequestInfo

__all__ = ["Query", "UsageQuery"]


class Query(Caller):
    """One usage query: its caller and the month it asks about (internal, mutable)."""

    __slots__ = ("month",)

    month: str


class UsageQuery:
    """Builds the usage.lua call of a usage query and renders its reply."""

    def __init__(self, config: Config, keys: KeySchema, credentials: Credentials):
        self.config = config
        self.keys = keys
        self.credentials = credentials

    def call(self, info: RequestInfo) -> tuple[Query, ScriptCall] | Decision:
        """The usage.lua call for the caller's credentials, or a refusal."""
        if info.method not in ("GET", "HEAD"):
            return refusal("method_not_allowed", "use GET")
        query = Query()
        query.month = _this_month()[0]
        refused = self.credentials.authenticate(info, query)
        if refused is not None:
            return refused
        keys = self.keys.tenant(query.tenant_id)
        return query, ("usage", [keys.rate_limit, keys.quota(query.month), keys.record,
                                 keys.api_keys],
                       [query.mode, query.month, query.key_hash, WINDOW_MS])

    def unavailable(self) -> Decision:
        """The refusal while Redis cannot answer."""
        return refusal("store_unavailable", "usage accounting is unavailable; retry shortly",
                       retry_after_s=max(1, math.ceil(self.config.redis.retry_interval_s)))

    def report(self, query: Query, reply: list[Any]) -> Decision:
        """The caller's own usage this month, as a JSON response (the usage endpoint)."""
        if int(reply[0]) != 0:
            return self.credentials.refused(query, reply)
        tier = query.tier if not query.stored else self.config.tiers.get(reply[4].decode())
        if tier is None:
            return refusal("unknown_tenant", f"tenant {query.tenant_id!r} has a tier this "
                                             "deployment does not define")
        used = int(reply[2])
        body = {
            "tenant_id": query.tenant_id,
            "tier": tier.name,
            "month": query.month,
            "tokens_used": used,
            "monthly_quota": tier.monthly_quota,
            "tokens_remaining": (None if tier.monthly_quota is None
                                 else max(0, tier.monthly_quota - used)),
            "rate_limit_per_minute": tier.rate_limit,
            "requests_last_minute": int(reply[3]),
            "allowed_models": list(tier.allowed_models),
        }
        return Decision(True, 200, (("content-type", "application/json"),),
                        json.dumps(body, separators=(",", ":")).encode())
