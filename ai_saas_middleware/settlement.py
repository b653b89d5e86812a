"""The usage event of an admitted request, and the settle.lua call that records it.

:func:`usage_counts` decides which token counts are billed (the handler's, the provider's,
else an estimate); :meth:`Settlement.call` prices them and builds the one settle.lua
call that appends the event to the stream and settles the quota reservation, once per
request id. No I/O: the gateway twins run (or spool) the call.
"""

from __future__ import annotations

import time
from decimal import Decimal

from .admission import QUOTA_TTL_S, ScriptCall
from .config import Config
from .context import RequestContext, Ticket
from .estimate import estimate_tokens
from .pricing import cost_of, format_usd
from .types import Outcome

__all__ = ["Settlement", "usage_counts"]

_iso_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def _iso(ms: int) -> str:
    """ISO-8601 UTC with milliseconds; the second's text is reused while it lasts (every
    settlement of the same second shares it)."""
    global _iso_second
    second = ms // 1000
    cached = _iso_second  # one read: another thread may swap it meanwhile
    if cached[0] != second:
        cached = _iso_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S",
                                                      time.gmtime(second)))
    return f"{cached[1]}.{ms % 1000:03d}Z"


def usage_counts(ticket: Ticket, ctx: RequestContext | None, outcome: Outcome
                 ) -> tuple[int, int, str]:
    """(prompt tokens, completion tokens, source) to bill: what the handler recorded, else
    what the provider reported, else an estimate (nothing at all when the request failed
    having produced nothing). A tuple, not a :class:`~ai_saas_middleware.types.Usage`:
    building that frozen dataclass costs about 1.2 us, on every settlement."""
    if ctx is not None and ctx.usage is not None:
        usage = ctx.usage
        return usage.prompt_tokens, usage.completion_tokens, usage.source
    if outcome.provider_usage is not None:
        return outcome.provider_usage[0], outcome.provider_usage[1], "provider"
    failed = outcome.failed or (ctx is not None and ctx.failed) or outcome.status >= 400
    if failed and not outcome.completion_chars:
        return 0, 0, "estimate"  # nothing was produced: release the reservation
    return ticket.prompt_estimate, estimate_tokens(outcome.completion_chars), "estimate"


class Settlement:
    """Builds the settle.lua call of admitted requests."""

    def __init__(self, config: Config):
        self._dedupe_ttl_s = config.redis.dedupe_ttl_s
        self._hits_count = config.cache.count_towards_quota

    def call(self, ticket: Ticket, outcome: Outcome, ctx: RequestContext | None
             ) -> tuple[ScriptCall, tuple[str, str, int, int] | None]:
        """The settle.lua call for the request's usage event, and what it tells the
        observed statistics (endpoint pattern, model, completion tokens, latency ms; None
        when the request got no answer)."""
        hit = ctx.cache.hit if ctx is not None and ctx.cache is not None else None
        model = (ctx.answered_by or ctx.model) if ctx is not None else ticket.model
        assert model is not None
        if hit is None:
            prompt_tokens, completion_tokens, source = usage_counts(ticket, ctx, outcome)
            cost = cost_of(model, prompt_tokens, completion_tokens)
        else:  # answered from the cache: nothing spent; the quota counts it if told to
            prompt_tokens, completion_tokens = ((hit.prompt_tokens, hit.completion_tokens)
                                                if self._hits_count else (0, 0))
            source, cost = "cache", Decimal(0)
        latency_ms = int((time.monotonic() - ticket.started) * 1000)
        event = [
            "request_id", ticket.request_id,
            "tenant_id", ticket.tenant_id,
            "tier", ticket.tier,
            "model_id", model.id,
            "provider", model.provider,
            "prompt_tokens", prompt_tokens,
            "completion_tokens", completion_tokens,
            "usage_source", source,
            "cost", format_usd(cost),
            "latency_ms", latency_ms,
            "status", outcome.status,
            "cache", "miss" if hit is None else "hit",
            "fallback_from", (ctx.fallback_from if ctx is not None else None) or "",
            "outcome_value", (ctx.outcome_value if ctx is not None else None) or "",
            "ts", _iso(ticket.admitted_ms),
            "endpoint", ticket.endpoint.path if ticket.endpoint is not None else "",
            "client_disconnected", "true" if outcome.disconnected else "false",
            "price_version", ticket.price_version,
            "truncated", "true" if ctx is not None and ctx.truncated else "false",
        ]
        if hit is not None:
            event += ["saved_cost", format_usd(hit.saved_cost), "cache_match", hit.kind]
        keys = ticket.keys
        sample = None
        if completion_tokens and outcome.status < 400 and ticket.endpoint is not None:
            sample = (ticket.endpoint.path, model.id, completion_tokens, latency_ms)
        # The real tokens, not a delta: settle.lua releases what Redis holds of this
        # request's reservation, which a lost admission reply leaves unknown here.
        return ("settle", [keys.quota(ticket.month), keys.stream, keys.settled(ticket.request_id),
                           keys.reservations],
                [prompt_tokens + completion_tokens, self._dedupe_ttl_s, QUOTA_TTL_S,
                 ticket.reservation, *event]), sample
