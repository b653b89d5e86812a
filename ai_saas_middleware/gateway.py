"""The framework-agnostic core: admission before the handler, settlement after.

:class:`Gateway` (sync, redis-py) and :class:`AsyncGateway` (asyncio, ``redis.asyncio``)
are twins with the same method names. All of their logic lives, without I/O, in
:class:`_Core`; the twins only run the Redis calls it asks for. Admission and settlement
are written as generators that *yield* a script call and are *sent* its reply (or
*thrown* the :class:`StoreError`), so one body of logic serves both I/O styles::

    decision = gateway.admit(info)               # one EVALSHA of admit.lua
    if decision.allowed:
        try: ... run the handler with decision.context ...
        finally: gateway.settle(decision.ticket, outcome, decision.context)   # one EVALSHA

A request costs one Redis round trip before the handler and one after. The only
exceptions: the first request of a Redis-stored tenant in a process (and the first
after ``ai-saas tenants set-tier``) costs one more, to learn its tier; and a request
whose app server's clock is in another month than Redis's costs one more.

Outside a web request, ``with gateway.request(tenant_id=..., endpoint=...) as ctx:``
(``async with`` on :class:`AsyncGateway`) gives background jobs the same admission,
context and settlement.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from . import background
from .allowance import LocalAllowance
from .config import Config, EndpointConfig, TenantConfig, TierConfig, load_config
from .context import RequestContext, Ticket
from .errors import (
    NoEligibleModel,
    QuotaExceeded,
    RateLimited,
    RequestRefused,
    StoreError,
    StoreRefused,
    UnknownTenant,
)
from .estimate import estimate_tokens
from .inputs import declared_length, parse_body, requirements, too_large
from .leases import LeaseKeeper
from .pricing import cost_of, format_usd
from .responses import refusal
from .routing import Requirements, Selection, select_model
from .spool import Spool
from .startup import check_redis_at_startup
from .store.keys import KeySchema, is_valid_tenant_id, reservation_member
from .store.redis import AsyncRedisStore, RedisStore
from .types import Decision, Outcome, RequestInfo, Usage

__all__ = ["AsyncGateway", "Gateway"]

log = logging.getLogger("ai_saas_middleware")

WINDOW_MS = 60_000  # rate limits are per minute
QUOTA_TTL_S = 62 * 86400  # a month's counter outlives its month, for reports
STORED_KEY_PREFIX = "ais_"
_STORED_KEY_SECRET = 32  # hex digits of a stored tenant's key, before "_<tenant>"
_TIER_TTL_S = 300.0  # how long a stored tenant's tier is trusted before it is rechecked

ScriptCall = tuple[str, list[str], list[Any]]  # ("admit" | "settle" | "usage", KEYS, ARGV)
ADMIT_ATTEMPTS = 3  # a month corrected by Redis, then a stored tier learnt: at most 3


def _month_bounds(year: int, month: int) -> tuple[str, int, int]:
    """('YYYY-MM', its first second, the next month's first second), UTC."""
    following = (year + 1, 1) if month == 12 else (year, month + 1)
    return (f"{year:04d}-{month:02d}", calendar.timegm((year, month, 1, 0, 0, 0)),
            calendar.timegm((*following, 1, 0, 0, 0)))


_month: tuple[str, int, int] = ("", 0, 0)  # this month, its first second, next month's


def _this_month() -> tuple[str, int, int]:
    """('YYYY-MM', start, end) of the current UTC month by this server's clock (cached)."""
    global _month
    now = time.time()
    if not _month[1] <= now < _month[2]:
        t = time.gmtime(now)
        _month = _month_bounds(t.tm_year, t.tm_mon)
    return _month


class _RequestIds:
    """Unique request ids without a system call each: a random per-process prefix (made
    anew in a forked child) and a counter. 'req_' + 12 + 12 hex digits."""

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self._prefix = "req_" + secrets.token_hex(6)
        self._count = itertools.count(int.from_bytes(os.urandom(4), "big"))

    def next(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFFFFFFFFFF:012x}"


_request_ids = _RequestIds()
if hasattr(os, "register_at_fork"):  # a forked worker must not repeat its parent's ids
    os.register_at_fork(after_in_child=_request_ids.reseed)


def _seconds_to_next_month(now_ms: int) -> int:
    t = time.gmtime(now_ms // 1000)
    return max(1, _month_bounds(t.tm_year, t.tm_mon)[2] - now_ms // 1000)


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


def hash_api_key(key: str) -> str:
    """The hex SHA-256 of an API key, as config (``sha256:<hex>``) and Redis store it."""
    return hashlib.sha256(key.encode()).hexdigest()


def stored_key_tenant(key: str) -> str | None:
    """The tenant id a stored-tenant key (``ais_<32 hex>_<tenant>``) names, if well formed."""
    n = len(STORED_KEY_PREFIX) + _STORED_KEY_SECRET
    if not key.startswith(STORED_KEY_PREFIX) or len(key) < n + 2 or key[n] != "_":
        return None
    secret = key[len(STORED_KEY_PREFIX):n]
    if any(c not in "0123456789abcdef" for c in secret):
        return None
    return key[n + 1:]


def new_stored_key(tenant_id: str) -> str:
    """A fresh API key for a Redis-stored tenant. Shown once; only its hash is kept."""
    return f"{STORED_KEY_PREFIX}{secrets.token_hex(_STORED_KEY_SECRET // 2)}_{tenant_id}"


class _Plan:
    """One AI request on its way through admission (internal, mutable)."""

    __slots__ = ("body", "endpoint", "key_hash", "max_output_tokens", "mode", "month",
                 "month_end", "month_start", "prompt_tokens", "request_id", "selection",
                 "stored", "tenant_id", "tier")

    tenant_id: str
    tier: TierConfig
    mode: str  # static | key | stored (see admit.lua)
    key_hash: str
    endpoint: EndpointConfig
    body: dict[str, Any]
    prompt_tokens: int
    max_output_tokens: int
    selection: Selection
    request_id: str
    month: str
    month_start: int
    month_end: int
    stored: bool

    def __init__(self) -> None:
        self.mode = "static"
        self.key_hash = ""
        self.month, self.month_start, self.month_end = _this_month()
        self.stored = False


class _Core:
    """Everything the twins share; no I/O."""

    leases: LeaseKeeper  # set by each twin, with the store its renewals use
    store: Any  # the twin's RedisStore or AsyncRedisStore

    def __init__(self, config: Config | Mapping[str, Any] | str | os.PathLike[str], *,
                 redis_url: str | None = None, startup_check: bool = True):
        self.config = load_config(config)
        cfg = self.config
        self.redis_url = redis_url or cfg.redis.url or os.environ.get("REDIS_URL") or None
        self.keys = KeySchema(cfg.redis.key_prefix, cfg.redis.shards)
        self._endpoints = cfg.endpoints
        self._key_index: dict[str, TenantConfig] = {
            digest: tenant for tenant in cfg.tenants.values() for digest in tenant.api_key_hashes
        }
        self._stored_tiers: dict[str, tuple[str, float]] = {}
        self._verified_keys: dict[str, str] = {}  # key hash -> stored tenant, for outages
        self._tenant_header = cfg.http.tenant_header
        self.max_body_bytes = cfg.http.max_body_bytes
        self.spool = Spool(cfg.redis.spool_dir or Spool.default_dir(cfg.redis.key_prefix),
                           self.keys)
        self.allowance = LocalAllowance()
        self._degraded = False
        self._rate_headers = {  # the fixed RateLimit headers of each tier, made once
            t.name: (("ratelimit-limit", str(t.rate_limit)),
                     ("ratelimit-policy", f"{t.rate_limit};w=60"))
            for t in cfg.tiers.values() if t.rate_limit}
        # One PING now, so that a wrong URL or a Redis not running shows at start-up (one
        # WARNING), not at the first AI request; waits at most redis.connectTimeout. (The
        # ASGI middleware, built on a server's first request, checks at its lifespan
        # start-up instead: a gateway built for a plain page must not call Redis.)
        self._startup_check = (check_redis_at_startup(cfg, self.redis_url) if startup_check
                               else None)

    def check_redis(self) -> None:
        """The start-up check (see :mod:`~ai_saas_middleware.startup`), now: one PING, one
        WARNING when Redis does not answer. Blocks for at most ``redis.connectTimeout``."""
        self._startup_check = check_redis_at_startup(self.config, self.redis_url)

    # ---------------------------------------------------------------- matching

    def endpoint_for(self, method: str, path: str) -> EndpointConfig | None:
        """The AI endpoint ``path`` belongs to, or None (then the request is not ours)."""
        for endpoint in self._endpoints:
            if endpoint.matches(method, path):
                return endpoint
        return None

    def declared_length(self, headers: Mapping[str, str]) -> int | Decision | None:
        """See :func:`ai_saas_middleware.inputs.declared_length`."""
        return declared_length(headers, self.max_body_bytes)

    def too_large(self) -> Decision:
        """The refusal for a body over ``http.maxBodyBytes``."""
        return too_large(self.max_body_bytes)

    # ---------------------------------------------------------------- admission

    def _authenticate(self, info: RequestInfo, plan: _Plan) -> Decision | None:
        tenant_id = info.tenant_id
        if tenant_id is not None and not isinstance(tenant_id, str):
            raise TypeError("a tenant resolver must return a tenant id (str) or None, not "
                            f"{type(tenant_id).__name__}")
        if tenant_id is None and self._tenant_header is not None:
            tenant_id = info.headers.get(self._tenant_header)
        if tenant_id is not None:
            if not is_valid_tenant_id(tenant_id):
                return refusal("invalid_tenant_id",
                               "tenant id must be 1 to 64 characters of [A-Za-z0-9_.-]")
            static = self.config.tenants.get(tenant_id)
            plan.tenant_id = tenant_id
            if static is None:
                plan.mode, plan.stored = "stored", True
            else:
                plan.tier = self.config.tiers[static.tier]
            return None
        key = info.headers.get("x-api-key")
        if key is None:
            auth = info.headers.get("authorization", "")
            scheme, _, credentials = auth.partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                key = credentials.strip()
        if not key:
            return refusal("missing_api_key", "no API key: send 'Authorization: Bearer <key>' "
                                              "or 'X-API-Key: <key>'")
        digest = hash_api_key(key)
        static = self._key_index.get(digest)
        if static is not None:
            plan.tenant_id = static.id
            plan.tier = self.config.tiers[static.tier]
            return None
        tenant_id = stored_key_tenant(key)
        if tenant_id is None or not is_valid_tenant_id(tenant_id) \
                or tenant_id in self.config.tenants:
            return refusal("invalid_api_key", "the API key is not valid")
        plan.tenant_id, plan.mode, plan.key_hash, plan.stored = tenant_id, "key", digest, True
        return None

    def _stored_tier(self, tenant_id: str) -> TierConfig | None:
        known = self._stored_tiers.get(tenant_id)
        if known is None or known[1] < time.monotonic():
            return None
        return self.config.tiers.get(known[0])

    def _parse_body(self, info: RequestInfo, plan: _Plan) -> Decision | None:
        parsed = parse_body(info, plan.endpoint, self.config.quota.prompt_estimate)
        if isinstance(parsed, Decision):
            return parsed
        plan.body, plan.max_output_tokens, plan.prompt_tokens = parsed
        return None

    def _requirements(self, info: RequestInfo, plan: _Plan) -> Requirements | Decision:
        return requirements(info.headers, plan.endpoint, plan.body, plan.prompt_tokens,
                            plan.max_output_tokens)

    def _select(self, info: RequestInfo, plan: _Plan) -> Decision | None:
        needs = self._requirements(info, plan)
        if isinstance(needs, Decision):
            return needs
        selection = select_model(plan.tier, self.config.models, needs)
        if selection.chosen is None:
            if selection.unhealthy_only:
                return refusal("no_healthy_model", "every eligible model is unavailable",
                               retry_after_s=int(self.config.routing.circuit_breaker
                                                 .reset_timeout_s))
            reason = selection.explain() or f"tier {plan.tier.name!r} allows no model"
            return refusal("no_eligible_model", f"no model meets this request's needs: {reason}")
        plan.selection = selection
        return None

    def _admit_call(self, plan: _Plan) -> ScriptCall:
        keys = self.keys.tenant(plan.tenant_id)
        tier = plan.tier
        return ("admit",
                [keys.rate_limit, keys.quota(plan.month), keys.record, keys.api_keys,
                 keys.reservations],
                [plan.request_id, plan.month, plan.mode, plan.key_hash, tier.name,
                 tier.rate_limit or 0, WINDOW_MS,
                 -1 if tier.monthly_quota is None else tier.monthly_quota,
                 plan.prompt_tokens + plan.max_output_tokens, QUOTA_TTL_S,
                 plan.month_start, plan.month_end, self.leases.lease_ms])

    def _admitted(self, plan: _Plan, now_ms: int, remaining: int, reset_ms: int,
                  local: bool = False) -> Decision:
        tier = plan.tier
        selection = plan.selection
        chosen = selection.candidates[0]
        reserve = plan.prompt_tokens + plan.max_output_tokens
        member = reservation_member(plan.request_id, reserve, plan.month)
        started = time.monotonic()
        ticket = Ticket(plan.request_id, plan.tenant_id, tier.name,
                        self.keys.tenant(plan.tenant_id), plan.month, 0 if local else reserve,
                        plan.prompt_tokens, now_ms, started, plan.endpoint, local, chosen,
                        member)
        # Held also when admitted locally: admit.lua may have run with its reply lost, and
        # then Redis holds a reservation that the renewals keep (renew.lua skips others).
        self.leases.hold(plan.request_id, ticket.keys, member, started)
        ctx = RequestContext(tenant_id=plan.tenant_id, tier=tier.name, model=chosen,
                             candidates=selection.candidates, request_id=plan.request_id,
                             max_output_tokens=plan.max_output_tokens, body=plan.body,
                             ticket=ticket)
        if tier.rate_limit:
            limit, policy = self._rate_headers[tier.name]
            headers: tuple[tuple[str, str], ...] = (
                ("x-request-id", plan.request_id), ("x-ai-model", chosen.id), limit,
                ("ratelimit-remaining", str(remaining if remaining > 0 else 0)),
                ("ratelimit-reset", str(-(-reset_ms // 1000))), policy)
        else:
            headers = (("x-request-id", plan.request_id), ("x-ai-model", chosen.id))
        return Decision(True, 200, headers, context=ctx, ticket=ticket)

    def _refused_by_limit(self, plan: _Plan, reply: list[Any]) -> Decision:
        tier = plan.tier
        if reply[0] == 1:
            retry = max(1, math.ceil(int(reply[2]) / 1000))
            decision = refusal(
                "rate_limit_exceeded",
                f"rate limit of {tier.rate_limit} requests per minute reached for tier "
                f"{tier.name!r}; retry in {retry}s",
                retry_after_s=retry,
                headers=(("ratelimit-limit", str(tier.rate_limit)), ("ratelimit-remaining", "0"),
                         ("ratelimit-reset", str(retry)),
                         ("ratelimit-policy", f"{tier.rate_limit};w=60")))
            return decision
        remaining = max(0, int(reply[2]))
        retry = _seconds_to_next_month(int(reply[1]))
        reserve = plan.prompt_tokens + plan.max_output_tokens
        return refusal(
            "quota_exceeded",
            f"monthly token quota of {tier.monthly_quota} for tier {tier.name!r} cannot hold "
            f"this request: {reserve} tokens needed (prompt estimate + max_tokens), "
            f"{remaining} left this month",
            retry_after_s=retry,
            headers=(("ratelimit-limit", str(tier.monthly_quota)),
                     ("ratelimit-remaining", str(remaining)),
                     ("ratelimit-reset", str(retry)),
                     ("ratelimit-policy", f'{tier.monthly_quota};w=2592000;name="tokens"')))

    def _prepare(self, info: RequestInfo, endpoint: EndpointConfig) -> _Plan | Decision:
        """Everything admission does before Redis: credentials, body, model. No I/O."""
        plan = _Plan()
        plan.endpoint = endpoint
        refused = self._authenticate(info, plan) or self._parse_body(info, plan)
        if refused is not None:
            return refused
        plan.request_id = _request_ids.next()
        if plan.stored:
            tier = self._stored_tier(plan.tenant_id)
            plan.tier = tier if tier is not None else TierConfig("", 0, 0, ())
        if plan.tier.name:
            refused = self._select(info, plan)
            if refused is not None:
                return refused
        return plan

    def _interpret(self, plan: _Plan, info: RequestInfo, reply: list[Any]) -> Decision | None:
        """What admit.lua's reply means; None when the script is to be sent again (with
        the server's month, or the stored tenant's real tier).

        Raises:
            StoreError: a reply of no shape admit.lua gives (a connection out of step).
        """
        if not isinstance(reply, list) or not reply or not isinstance(reply[0], int):
            self.store.out_of_step()
            raise StoreError(f"admit.lua's reply was not its own ({str(reply)[:40]}): the "
                             "connection is out of step")
        code = reply[0]
        if code == 0:
            if self._degraded:  # Redis is back; the allowance is not renewed by it
                self._degraded = False
                self.allowance.forget_expired()
            if plan.stored:
                self._stored_tiers[plan.tenant_id] = (plan.tier.name,
                                                      time.monotonic() + _TIER_TTL_S)
                if plan.key_hash:
                    self._verified_keys[plan.key_hash] = plan.tenant_id
            return self._admitted(plan, int(reply[1]), int(reply[2]), int(reply[3]))
        if code in (1, 2):
            return self._refused_by_limit(plan, reply)
        if code in (3, 4):
            return self._credentials_refused(plan, reply)
        if code == 5:  # the app server's clock is in another month than Redis's
            year, month = map(int, reply[2].decode().split("-"))
            plan.month, plan.month_start, plan.month_end = _month_bounds(year, month)
            return None
        if code == 6:  # the stored tier differs from what this process believed
            tier = self.config.tiers.get(reply[2].decode())
            if tier is None:
                log.error("stored tenant %s has tier %r, which the config does not define",
                          plan.tenant_id, reply[2].decode())
                return refusal("unknown_tenant", f"tenant {plan.tenant_id!r} has a tier this "
                                                 "deployment does not define")
            plan.tier = tier
            self._stored_tiers[plan.tenant_id] = (tier.name, time.monotonic() + _TIER_TTL_S)
            return self._select(info, plan)
        raise StoreError(f"admit.lua answered an unknown code {code}")

    def _credentials_refused(self, plan: _Plan, reply: list[Any]) -> Decision:
        """The refusal for admit.lua's / usage.lua's codes 3 (key) and 4 (no tenant)."""
        if int(reply[0]) == 3:
            self._verified_keys.pop(plan.key_hash, None)
            if reply[2] == b"revoked":
                return refusal("revoked_api_key", "the API key has been revoked")
            return refusal("invalid_api_key", "the API key is not valid")
        self._stored_tiers.pop(plan.tenant_id, None)
        if plan.mode == "key":
            return refusal("invalid_api_key", "the API key is not valid")
        return refusal("unknown_tenant", f"no tenant {plan.tenant_id!r}")

    def _usage_call(self, info: RequestInfo) -> tuple[_Plan, ScriptCall] | Decision:
        """The usage.lua call for the caller's credentials, or a refusal."""
        if info.method not in ("GET", "HEAD"):
            return refusal("method_not_allowed", "use GET")
        plan = _Plan()
        refused = self._authenticate(info, plan)
        if refused is not None:
            return refused
        keys = self.keys.tenant(plan.tenant_id)
        return plan, ("usage", [keys.rate_limit, keys.quota(plan.month), keys.record,
                                keys.api_keys], [plan.mode, plan.month, plan.key_hash, WINDOW_MS])

    def _usage_unavailable(self) -> Decision:
        return refusal("store_unavailable", "usage accounting is unavailable; retry shortly",
                       retry_after_s=max(1, math.ceil(self.config.redis.retry_interval_s)))

    def _usage_report(self, plan: _Plan, reply: list[Any]) -> Decision:
        """The caller's own usage this month, as a JSON response (the usage endpoint)."""
        if int(reply[0]) != 0:
            return self._credentials_refused(plan, reply)
        tier = plan.tier if not plan.stored else self.config.tiers.get(reply[4].decode())
        if tier is None:
            return refusal("unknown_tenant", f"tenant {plan.tenant_id!r} has a tier this "
                                             "deployment does not define")
        used = int(reply[2])
        body = {
            "tenant_id": plan.tenant_id,
            "tier": tier.name,
            "month": plan.month,
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

    def _admit_locally(self, plan: _Plan, info: RequestInfo, exc: StoreError) -> Decision:
        """Redis is unreachable: serve within the per-process allowance, or refuse (503)."""
        tier = plan.tier
        policy = tier.on_unavailable or self.config.redis.on_unavailable
        verified = not plan.key_hash or self._verified_keys.get(plan.key_hash) == plan.tenant_id
        if isinstance(exc, StoreRefused):  # not an outage: this request's call can never run
            log.error("admission of %s refused by Redis, following onUnavailable (%s): %s",
                      plan.request_id, policy, exc)
        if policy == "closed" or not tier.name or not verified:
            log.warning("refusing an AI request while Redis is unavailable: %s", exc)
            return refusal("store_unavailable", "usage accounting is unavailable; retry shortly",
                           retry_after_s=max(1, math.ceil(self.config.redis.retry_interval_s)))
        reserve = plan.prompt_tokens + plan.max_output_tokens
        self._degraded = True
        verdict = self.allowance.take(plan.tenant_id, tier, reserve, WINDOW_MS)
        if verdict is not None:
            return self._refused_by_limit(plan, verdict)
        # The RateLimit headers tell what this process's allowance has left (the limit it
        # holds the tenant to now), not the 0 a client would take as "back off".
        remaining, reset_ms = (self.allowance.requests_left(plan.tenant_id, tier.rate_limit,
                                                            WINDOW_MS)
                               if tier.rate_limit else (0, WINDOW_MS))
        return self._admitted(plan, int(time.time() * 1000), remaining, reset_ms, local=True)

    # ---------------------------------------------------------------- settlement

    def _usage(self, ticket: Ticket, ctx: RequestContext | None, outcome: Outcome) -> Usage:
        if ctx is not None and ctx.usage is not None:
            return ctx.usage
        if outcome.provider_usage is not None:
            return Usage(outcome.provider_usage[0], outcome.provider_usage[1], "provider")
        failed = outcome.failed or (ctx is not None and ctx.failed) or outcome.status >= 400
        if failed and not outcome.completion_chars:
            return Usage(0, 0, "estimate")  # nothing was produced: release the reservation
        return Usage(ticket.prompt_estimate, estimate_tokens(outcome.completion_chars),
                     "estimate")

    def _settle_call(self, ticket: Ticket, outcome: Outcome,
                     ctx: RequestContext | None) -> ScriptCall:
        usage = self._usage(ticket, ctx, outcome)
        model = (ctx.answered_by or ctx.model) if ctx is not None else ticket.model
        assert model is not None
        cost = cost_of(model, usage.prompt_tokens, usage.completion_tokens)
        latency_ms = int((time.monotonic() - ticket.started) * 1000)
        event = [
            "request_id", ticket.request_id,
            "tenant_id", ticket.tenant_id,
            "tier", ticket.tier,
            "model_id", model.id,
            "provider", model.provider,
            "prompt_tokens", usage.prompt_tokens,
            "completion_tokens", usage.completion_tokens,
            "usage_source", usage.source,
            "cost", format_usd(cost),
            "latency_ms", latency_ms,
            "status", outcome.status,
            "cache", "miss",
            "fallback_from", (ctx.fallback_from if ctx is not None else None) or "",
            "outcome_value", (ctx.outcome_value if ctx is not None else None) or "",
            "ts", _iso(ticket.admitted_ms),
            "endpoint", ticket.endpoint.path if ticket.endpoint is not None else "",
            "client_disconnected", "true" if outcome.disconnected else "false",
        ]
        keys = ticket.keys
        self.leases.drop(ticket.request_id)
        # The real tokens, not a delta: settle.lua releases what Redis holds of this
        # request's reservation, which a lost admission reply leaves unknown here.
        return ("settle", [keys.quota(ticket.month), keys.stream, keys.settled(ticket.request_id),
                           keys.reservations],
                [usage.total_tokens, self.config.redis.dedupe_ttl_s, QUOTA_TTL_S,
                 ticket.reservation, *event])

    # ---------------------------------------------------------------- background jobs

    def _job_info(self, tenant_id: str, endpoint: str | None, body: Mapping[str, Any] | None,
                  headers: Mapping[str, str] | None) -> tuple[RequestInfo, EndpointConfig]:
        matched = self.endpoint_for("POST", endpoint) if endpoint else None
        if endpoint and matched is None:
            raise ValueError(f"{endpoint!r} matches no configured endpoint")
        chosen = matched or EndpointConfig(path=endpoint or "<job>")
        raw = json.dumps(dict(body or {})).encode()
        hdrs = {"content-type": "application/json", **{k.lower(): v for k, v in
                                                       (headers or {}).items()}}
        return RequestInfo("POST", chosen.path, hdrs, raw, tenant_id=tenant_id), chosen

    @staticmethod
    def _raise_refusal(decision: Decision) -> None:
        code = decision.error_code
        if code == "rate_limit_exceeded":
            raise RateLimited(decision)
        if code == "quota_exceeded":
            raise QuotaExceeded(decision)
        if code in ("no_eligible_model", "no_healthy_model"):
            raise NoEligibleModel(decision)
        if code in ("unknown_tenant", "invalid_tenant_id"):
            raise UnknownTenant(decision.error_message)
        raise RequestRefused(decision)

    @staticmethod
    def _job_outcome(ctx: RequestContext, failed: bool) -> Outcome:
        return Outcome(status=500 if failed else 200, failed=failed)


class Gateway(_Core):
    """Synchronous gateway (WSGI apps, workers, scripts).

    Args:
        config: a YAML path, a dict, or a loaded :class:`~ai_saas_middleware.config.Config`.
        redis_url: overrides ``redis.url`` (else ``REDIS_URL``, else localhost).
    """

    def __init__(self, config: Config | Mapping[str, Any] | str | os.PathLike[str], *,
                 redis_url: str | None = None):
        super().__init__(config, redis_url=redis_url)
        self.store = RedisStore(self.config.redis, self.redis_url)
        self.leases = LeaseKeeper(self.config.quota.reservation_timeout_s, lambda: self.store,
                                  spool=self.spool)

    def _run(self, call: ScriptCall) -> Any:
        return self.store.run_script(*call)

    def admit(self, info: RequestInfo, endpoint: EndpointConfig | None = None) -> Decision:
        """Admit an AI request, or refuse it. One Redis round trip.

        Args:
            info: the request.
            endpoint: its endpoint, if the caller already matched it (else matched here).

        Returns:
            A :class:`Decision`; when ``allowed`` it carries the context and the ticket.
        """
        endpoint = endpoint or self.endpoint_for(info.method, info.path)
        if endpoint is None:
            raise ValueError(f"{info.method} {info.path} is not an AI endpoint")
        plan = self._prepare(info, endpoint)
        if isinstance(plan, Decision):
            return plan
        for _attempt in range(ADMIT_ATTEMPTS):
            try:
                reply = self._run(self._admit_call(plan))
                decision = self._interpret(plan, info, reply)
            except StoreError as exc:
                return self._admit_locally(plan, info, exc)
            if decision is not None:
                return decision
        raise StoreError("admission did not settle (the tier or the month kept moving)")

    def usage(self, info: RequestInfo) -> Decision:
        """The caller's own usage this month (credentials as for admission), as JSON."""
        call = self._usage_call(info)
        if isinstance(call, Decision):
            return call
        try:
            return self._usage_report(call[0], self._run(call[1]))
        except StoreError:
            return self._usage_unavailable()

    def settle(self, ticket: Ticket, outcome: Outcome, ctx: RequestContext | None = None) -> None:
        """Record the request's usage and settle its quota. One Redis round trip.

        Never raises for Redis trouble: an event that cannot be written now is spooled
        to disk and replayed, in order, when Redis is back.
        """
        call = self._settle_call(ticket, outcome, ctx)
        try:
            if self.spool.pending and not self.store.health.is_down():
                self.spool.replay(self._run)  # older events first: the stream stays in order
            if not self.spool.pending:
                try:
                    self._run(call)
                    return
                except StoreRefused as exc:  # can never succeed: set aside, loudly
                    self.spool.set_aside(call, exc)
                    return
                except StoreError as exc:
                    log.warning("usage event %s spooled: %s", ticket.request_id, exc)
        except BaseException:
            # Interrupted half way (a worker timeout's SystemExit, a KeyboardInterrupt):
            # whether the script ran is unknown; spooled, it is counted once either way.
            self.spool.append(call)
            raise
        self.spool.append(call)

    @contextlib.contextmanager
    def request(self, *, tenant_id: str, endpoint: str | None = None,
                body: Mapping[str, Any] | None = None,
                headers: Mapping[str, str] | None = None) -> Iterator[RequestContext]:
        """Admission, context and settlement for work outside a web request.

        Args:
            tenant_id: the (already verified) tenant.
            endpoint: a path of a configured endpoint, whose requirements apply.
            body: an OpenAI-style body (``messages``, ``max_tokens``, ``model``) used to
                estimate the prompt and reserve tokens.
            headers: optional requirement headers (``X-AI-Min-Quality`` ...).

        Raises:
            RateLimited, QuotaExceeded, NoEligibleModel, UnknownTenant, RequestRefused.
        """
        info, matched = self._job_info(tenant_id, endpoint, body, headers)
        decision = self.admit(info, matched)
        if not decision.allowed:
            self._raise_refusal(decision)
        ctx, ticket = decision.context, decision.ticket
        assert ctx is not None and ticket is not None
        failed = True
        try:
            yield ctx
            failed = False
        finally:
            self.settle(ticket, self._job_outcome(ctx, failed), ctx)

    def close(self) -> None:
        self.leases.close()
        self.store.close()


class AsyncGateway(_Core):
    """Asyncio twin of :class:`Gateway` (ASGI apps); every Redis call awaits."""

    def __init__(self, config: Config | Mapping[str, Any] | str | os.PathLike[str], *,
                 redis_url: str | None = None, startup_check: bool = True):
        super().__init__(config, redis_url=redis_url, startup_check=startup_check)
        self.store = AsyncRedisStore(self.config.redis, self.redis_url)
        # Renewals run in the keeper's thread, on a sync store of their own.
        self.leases = LeaseKeeper(self.config.quota.reservation_timeout_s,
                                  lambda: RedisStore(self.config.redis, self.redis_url),
                                  owns_store=True, spool=self.spool)

    async def _run(self, call: ScriptCall) -> Any:
        return await self.store.run_script(*call)

    async def admit(self, info: RequestInfo, endpoint: EndpointConfig | None = None) -> Decision:
        """See :meth:`Gateway.admit`."""
        endpoint = endpoint or self.endpoint_for(info.method, info.path)
        if endpoint is None:
            raise ValueError(f"{info.method} {info.path} is not an AI endpoint")
        plan = self._prepare(info, endpoint)
        if isinstance(plan, Decision):
            return plan
        for _attempt in range(ADMIT_ATTEMPTS):
            try:
                reply = await self._run(self._admit_call(plan))
                decision = self._interpret(plan, info, reply)
            except StoreError as exc:
                return self._admit_locally(plan, info, exc)
            except asyncio.CancelledError:
                # The client went away (or a scope was cancelled) with admit.lua's reply on
                # its way: whatever it reserved is given back by a task of its own (the
                # lease would release it too, only later).
                background.start(self._release(plan))
                raise
            if decision is not None:
                return decision
        raise StoreError("admission did not settle (the tier or the month kept moving)")

    async def _release(self, plan: _Plan) -> None:
        keys = self.keys.tenant(plan.tenant_id)
        try:
            member = reservation_member(plan.request_id,
                                        plan.prompt_tokens + plan.max_output_tokens, plan.month)
            await self._run(("release", [keys.reservations, keys.quota(plan.month)], [member]))
        except StoreError as exc:
            log.warning("reservation of cancelled request %s left to its lease: %s",
                        plan.request_id, exc)

    async def usage(self, info: RequestInfo) -> Decision:
        """See :meth:`Gateway.usage`."""
        call = self._usage_call(info)
        if isinstance(call, Decision):
            return call
        try:
            return self._usage_report(call[0], await self._run(call[1]))
        except StoreError:
            return self._usage_unavailable()

    async def settle(self, ticket: Ticket, outcome: Outcome,
                     ctx: RequestContext | None = None) -> None:
        """See :meth:`Gateway.settle`.

        Whatever interrupts it, the settlement is written or spooled, exactly once: a
        cancellation spools it before the ``CancelledError`` goes on.
        """
        call = self._settle_call(ticket, outcome, ctx)
        try:
            if self.spool.pending and not self.store.health.is_down():
                await self.spool.areplay(self._run)
            if not self.spool.pending:
                try:
                    await self._run(call)
                    return
                except StoreRefused as exc:  # can never succeed: set aside, loudly
                    self.spool.set_aside(call, exc)
                    return
                except StoreError as exc:
                    log.warning("usage event %s spooled: %s", ticket.request_id, exc)
        except BaseException:
            # Cancelled half way (a cancel scope around the request, a client hang-up, a
            # server shutting down): whether the script ran is unknown, and a cancelled
            # scope would cancel every further await. Spooled now, synchronously, it is
            # durable and counted once either way (settle.lua's marker); a task of its own,
            # outside the cancelled scope, replays it at once.
            self.spool.append(call)
            background.start(self._replay_spool())
            raise
        self.spool.append(call)

    async def _replay_spool(self) -> None:
        if not self.store.health.is_down():
            await self.spool.areplay(self._run)

    @contextlib.asynccontextmanager
    async def request(self, *, tenant_id: str, endpoint: str | None = None,
                      body: Mapping[str, Any] | None = None,
                      headers: Mapping[str, str] | None = None
                      ) -> AsyncIterator[RequestContext]:
        """See :meth:`Gateway.request`; use with ``async with``."""
        info, matched = self._job_info(tenant_id, endpoint, body, headers)
        decision = await self.admit(info, matched)
        if not decision.allowed:
            self._raise_refusal(decision)
        ctx, ticket = decision.context, decision.ticket
        assert ctx is not None and ticket is not None
        failed = True
        try:
            yield ctx
            failed = False
        finally:
            await self.settle(ticket, self._job_outcome(ctx, failed), ctx)

    async def close(self) -> None:
        self.leases.close()
        await self.store.close()

