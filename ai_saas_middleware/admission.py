"""The admission plan of an AI request: what admit.lua is asked, and what its reply means.

:meth:`Admission.prepare` does everything before Redis (credentials, the body, the model
chosen); :meth:`Admission.call` is the one admit.lua call that checks the rate limit and
reserves the tokens; :meth:`Admission.interpret` turns its reply into a
:class:`~ai_saas_middleware.types.Decision` (or asks for the call again, with the server's
month or a stored tenant's real tier); :meth:`Admission.admit_locally` serves within the
per-process allowance while Redis is unreachable. No I/O: the gateway twins run the call.

What admission grows goes here, each concern a module of its own that the plan calls:
model selection (:meth:`Admission.select`, where breakers and downgrades apply), the
reservation's terms (:meth:`Admission.call`'s ARGV, where a money budget joins the
tokens) and the reply's codes (:meth:`Admission.interpret`).
"""

from __future__ import annotations

import calendar
import itertools
import json
import logging
import math
import os
import secrets
import time
from typing import Any

from .allowance import LocalAllowance
from .breakers import BreakerBoard
from .budgets import Budgets
from .config import Config, EndpointConfig, TierConfig
from .context import RequestContext, Ticket
from .credentials import Caller, Credentials
from .errors import StoreError, StoreRefused
from .fallback import FallbackPolicy
from .inputs import parse_body, requirements
from .leases import LeaseKeeper
from .observed import ObservedStats
from .pricebook import PriceBook
from .providers import Providers
from .responses import refusal
from .routing import Requirements, Selection, select_model
from .store.keys import KeySchema, reservation_member
from .types import Decision, RequestInfo, allowed_decision

__all__ = ["ADMIT_ATTEMPTS", "QUOTA_TTL_S", "WINDOW_MS", "Admission", "Plan", "ScriptCall",
           "month_bounds"]

log = logging.getLogger("ai_saas_middleware")

WINDOW_MS = 60_000  # rate limits are per minute
QUOTA_TTL_S = 62 * 86400  # a month's counter outlives its month, for reports
ADMIT_ATTEMPTS = 3  # a month corrected by Redis, then a stored tier learnt: at most 3

ScriptCall = tuple[str, list[str], list[Any]]  # (script name, KEYS, ARGV)

_NO_TIER = TierConfig("", 0, 0, ())  # a stored tenant's, until Redis tells it
_NO_BUDGET = (-1, -1)


def month_bounds(year: int, month: int) -> tuple[str, int, int]:
    """('YYYY-MM', its first second, the next month's first second) of a month, UTC,
    in whole seconds since the epoch (December's end is the next year's 1 January)."""
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
        _month = month_bounds(t.tm_year, t.tm_mon)
    return _month


def _today() -> str:
    """'YYYY-MM-DD', UTC, by this server's clock."""
    return time.strftime("%Y-%m-%d", time.gmtime())


def default_response(text: str) -> Decision:
    """``routing.defaultResponse`` as a 200 chat completion of model ``default``."""
    body = json.dumps({"id": "default", "object": "chat.completion", "model": "default",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}}],
                       "usage": {"prompt_tokens": 0, "completion_tokens": 0,
                                 "total_tokens": 0}}, separators=(",", ":")).encode()
    return Decision(False, 200, (("content-type", "application/json"),
                                 ("x-ai-routing", "fallback")), body=body,
                    error_code="no_healthy_model",
                    error_message="answered with routing.defaultResponse")


def _seconds_to_next_month(now_ms: int) -> int:
    t = time.gmtime(now_ms // 1000)
    return max(1, month_bounds(t.tm_year, t.tm_mon)[2] - now_ms // 1000)


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


class Plan(Caller):
    """One AI request on its way through admission: its caller, body, model and the
    quota month it reserves in (internal, mutable)."""

    __slots__ = ("body", "budget", "cache", "endpoint", "max_output_tokens", "money", "month",
                 "month_end", "month_start", "needs", "price_version", "prompt_tokens",
                 "request_id", "selection")

    endpoint: EndpointConfig
    body: dict[str, Any]
    prompt_tokens: int
    max_output_tokens: int
    selection: Selection
    needs: Requirements
    money: int  # picodollars reserved against the budgets (0: no budget)
    budget: tuple[int, int]  # (monthly, daily) picodollars, -1 where none
    price_version: int  # the price book's version the selection priced with
    request_id: str
    month: str
    month_start: int
    month_end: int
    cache: Any  # its CachePlan (cache/policy.py), or None

    def __init__(self) -> None:
        self.cache = None
        self.mode = "static"
        self.key_hash = ""
        self.stored = False
        self.money = 0
        self.month, self.month_start, self.month_end = _this_month()


class Admission:
    """Prepares, calls for and interprets the admission of AI requests (no I/O).

    Args:
        config: the gateway's configuration.
        keys: its key schema.
        credentials: who is calling (shared with the usage endpoint).
        leases: the keeper of this process's reservations.
        store: the twin's store, told when a reply shows its connection out of step.
        breakers: the deployment's circuit breakers, as this process sees them.
        prices: the price book in force (model profiles that may change at run time).
        observed: what settled requests showed (completion averages, p99 latencies).
    """

    def __init__(self, config: Config, keys: KeySchema, credentials: Credentials,
                 leases: LeaseKeeper, store: Any, breakers: BreakerBoard, prices: PriceBook,
                 observed: ObservedStats):
        self.config = config
        self.breakers = breakers
        self.prices = prices
        self.observed = observed
        self._observed_latency = config.routing.use_observed_latency
        self.fallback = FallbackPolicy(config.routing, breakers, self.no_healthy_model)
        self.providers: Providers | None = None  # set by the gateway when configured
        self.budgets = Budgets(config)
        routing = config.routing
        self._strategy = routing.strategy
        self._downgrade_at = (float(routing.downgrade_at) if routing.downgrade_at is not None
                              else None)
        self.keys = keys
        self.credentials = credentials
        self.leases = leases
        self.store = store
        self.allowance = LocalAllowance()
        self._degraded = False
        self._keys_of: dict[str, tuple[str, list[str]]] = {}  # tenant -> (month, KEYS)
        # The response cache, when enabled (imported only then: it needs numpy).
        self.cache: Any = None
        if config.cache.enabled:
            from .cache.policy import ResponseCache

            self.cache = ResponseCache(config, keys)
        self._rate_headers = {  # the fixed RateLimit headers of each tier, made once
            t.name: (("ratelimit-limit", str(t.rate_limit)),
                     ("ratelimit-policy", f"{t.rate_limit};w=60"))
            for t in config.tiers.values() if t.rate_limit}

    # ---------------------------------------------------------------- before Redis

    def prepare(self, info: RequestInfo, endpoint: EndpointConfig) -> Plan | Decision:
        """Everything admission does before Redis: credentials, body, model. No I/O."""
        plan = Plan()
        plan.endpoint = endpoint
        refused = self.credentials.authenticate(info, plan) or self._parse_body(info, plan)
        if refused is not None:
            return refused
        plan.request_id = _request_ids.next()
        if plan.stored:
            tier = self.credentials.stored_tier(plan.tenant_id)
            plan.tier = tier if tier is not None else _NO_TIER
        if plan.tier.name:
            refused = self.select(info, plan)
            if refused is not None:
                return refused
        return plan

    def _parse_body(self, info: RequestInfo, plan: Plan) -> Decision | None:
        parsed = parse_body(info, plan.endpoint, self.config.quota.prompt_estimate)
        if isinstance(parsed, Decision):
            return parsed
        plan.body, plan.max_output_tokens, plan.prompt_tokens = parsed
        return None

    def select(self, info: RequestInfo, plan: Plan) -> Decision | None:
        """Choose the plan's model among its tier's, for the request's needs; a refusal
        when none qualifies."""
        needs = requirements(info.headers, plan.endpoint, plan.body, plan.prompt_tokens,
                             plan.max_output_tokens)
        if isinstance(needs, Decision):
            return needs
        needs.stated_output = "max_tokens" in plan.body or "max_completion_tokens" in plan.body
        breakers = self.breakers
        prices = self.prices.current
        plan.price_version = prices.version
        observed = self.observed
        selection = select_model(plan.tier, prices.models, needs,
                                 breakers.is_healthy if breakers.any_open else None,
                                 strategy=self._strategy,
                                 averages=(None if needs.stated_output
                                           else observed.averages(plan.endpoint.path)),
                                 latencies=observed.latencies() if self._observed_latency
                                 else None)
        if selection.chosen is None:
            if selection.unhealthy_only:
                return self.no_healthy_model(selection.excluded_for("breaker"))
            reason = selection.explain() or f"tier {plan.tier.name!r} allows no model"
            return refusal("no_eligible_model", f"no model meets this request's needs: {reason}")
        plan.selection = selection
        plan.needs = needs
        budget = self.budgets.limits(plan.tenant_id, plan.tier) if self.budgets.any else None
        if budget is not None and budget != (-1, -1):
            plan.budget = budget
            plan.money = self.budgets.worst_case(selection.unordered, plan.prompt_tokens,
                                                 plan.max_output_tokens)
        else:
            plan.money = 0
        cache = self.cache
        if cache is not None and cache.applies(plan.endpoint, plan.tier):
            plan.cache = cache.plan(plan.tenant_id, plan.endpoint, selection.chosen,
                                    plan.body, info.headers)
        return None

    def no_healthy_model(self, open_models: list[str]) -> Decision:
        """The 503 (or the configured default response) when every eligible model has an
        open breaker or failed; Retry-After: when the first breaker may be probed."""
        default = self.config.routing.default_response
        if default is not None:
            return default_response(default)
        retry = min(self.breakers.retry_after_s(open_models),
                    max(1, math.ceil(self.config.routing.circuit_breaker.reset_timeout_s)))
        return refusal("no_healthy_model",
                       "every eligible model is unavailable (circuit breakers open: "
                       f"{', '.join(open_models) or 'none'}); retry in {retry}s",
                       retry_after_s=retry)

    def downgrade(self, plan: Plan, reply: list[Any]) -> bool:
        """Past ``routing.downgradeAt`` of the token quota or a money budget (admit.lua's
        reply tells what is counted now): the cheapest eligible model first."""
        share = self._downgrade_at
        if share is None:
            return False
        quota = plan.tier.monthly_quota
        used = quota is not None and quota > 0 and int(reply[4]) / quota >= share
        if not used and plan.money:
            used = (self.budgets.share(reply[5], plan.budget[0]) >= share
                    or self.budgets.share(reply[6], plan.budget[1]) >= share)
        if not used:
            return False
        if self._strategy != "cost_optimized":
            breakers = self.breakers
            observed = self.observed
            plan.selection = select_model(
                plan.tier, self.prices.current.models, plan.needs,
                breakers.is_healthy if breakers.any_open else None,
                strategy=self._strategy, downgrade=True,
                averages=(None if plan.needs.stated_output
                          else observed.averages(plan.endpoint.path)),
                latencies=observed.latencies() if self._observed_latency else None)
        return True

    # ---------------------------------------------------------------- the admit.lua call

    def call(self, plan: Plan) -> ScriptCall:
        """The admit.lua call: rate limit, quota reservation and its lease (see its header)."""
        tier = plan.tier
        keys = self._admit_keys(plan.tenant_id, plan.month)
        args = [plan.request_id, plan.month, plan.mode, plan.key_hash, tier.name,
                tier.rate_limit or 0, WINDOW_MS,
                -1 if tier.monthly_quota is None else tier.monthly_quota,
                plan.prompt_tokens + plan.max_output_tokens, QUOTA_TTL_S,
                plan.month_start, plan.month_end, self.leases.lease_ms,
                plan.money, *(plan.budget if plan.money else _NO_BUDGET)]
        cache = plan.cache
        if cache is not None and cache.lookup:  # the exact lookup rides along (KEYS 6-8)
            extra_keys, extra_args = self.cache.admit_extra(cache)
            return ("admit", [*keys, *extra_keys], [*args, *extra_args])
        return ("admit", keys, args)

    def _admit_keys(self, tenant_id: str, month: str) -> list[str]:
        """admit.lua's KEYS for a tenant and month, built once each (five key names on
        every admission otherwise); the list is shared, and no caller changes it."""
        known = self._keys_of.get(tenant_id)
        if known is None or known[0] != month:
            k = self.keys.tenant(tenant_id)
            known = (month, [k.rate_limit, k.quota(month), k.record, k.api_keys,
                             k.reservations])
            if len(self._keys_of) < 100_000:  # bounded: ids come from verified credentials
                self._keys_of[tenant_id] = known
        return known[1]

    def release_call(self, plan: Plan) -> ScriptCall:
        """The release.lua call giving back what an admission whose reply was never read
        may have reserved."""
        keys = self.keys.tenant(plan.tenant_id)
        # (With money, the day is this server's guess of Redis's: should they differ, at
        # midnight, nothing is found and the lease releases it instead.)
        member = reservation_member(plan.request_id, plan.prompt_tokens + plan.max_output_tokens,
                                    plan.month, plan.money, _today() if plan.money else "")
        return ("release", [keys.reservations, keys.quota(plan.month)], [member])

    def interpret(self, plan: Plan, info: RequestInfo, reply: list[Any]) -> Decision | None:
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
                self.credentials.confirmed(plan)
            downgraded = self.downgrade(plan, reply) if self._downgrade_at is not None else False
            if plan.cache is not None and len(reply) > 8:
                plan.cache.partition_size = int(reply[8])
            return self._admitted(plan, int(reply[1]), int(reply[2]), int(reply[3]),
                                  day=reply[7].decode() if plan.money else "",
                                  downgraded=downgraded)
        if code == 8:  # an exact cache hit: admitted, nothing reserved
            return self.exact_hit(plan, reply)
        if code in (1, 2):
            return self._refused_by_limit(plan, reply)
        if code == 7:
            return self.budgets.refused(reply[2], reply[3], plan.money, plan.budget,
                                        int(reply[1]))
        if code in (3, 4):
            return self.credentials.refused(plan, reply)
        if code == 5:  # the app server's clock is in another month than Redis's
            year, month = map(int, reply[2].decode().split("-"))
            plan.month, plan.month_start, plan.month_end = month_bounds(year, month)
            return None
        if code == 6:  # the stored tier differs from what this process believed
            tier = self.config.tiers.get(reply[2].decode())
            if tier is None:
                log.error("stored tenant %s has tier %r, which the config does not define",
                          plan.tenant_id, reply[2].decode())
                return refusal("unknown_tenant", f"tenant {plan.tenant_id!r} has a tier this "
                                                 "deployment does not define")
            plan.tier = tier
            self.credentials.learn_tier(plan.tenant_id, tier.name)
            return self.select(info, plan)
        raise StoreError(f"admit.lua answered an unknown code {code}")

    def _admitted(self, plan: Plan, now_ms: int, remaining: int, reset_ms: int,
                  local: bool = False, day: str = "", downgraded: bool = False,
                  reserved: bool = True) -> Decision:
        tier = plan.tier
        selection = plan.selection
        chosen = selection.chosen
        assert chosen is not None
        reserve = plan.prompt_tokens + plan.max_output_tokens if reserved else 0
        if not reserved:  # an exact cache hit: admit.lua reserved nothing
            member = ""
        elif plan.money:
            member = reservation_member(plan.request_id, reserve, plan.month, plan.money,
                                        day or _today())
        else:
            member = reservation_member(plan.request_id, reserve, plan.month)
        started = time.monotonic()
        ticket = Ticket(plan.request_id, plan.tenant_id, tier.name,
                        self.keys.tenant(plan.tenant_id), plan.month, 0 if local else reserve,
                        plan.prompt_tokens, now_ms, started, plan.endpoint, local, chosen,
                        member, plan.price_version)
        # Held also when admitted locally: admit.lua may have run with its reply lost, and
        # then Redis holds a reservation that the renewals keep (renew.lua skips others).
        if reserved:
            self.leases.hold(plan.request_id, ticket.keys, member, started)
        ctx = RequestContext(tenant_id=plan.tenant_id, tier=tier.name, model=chosen,
                             candidates=selection, request_id=plan.request_id,
                             max_output_tokens=plan.max_output_tokens, body=plan.body,
                             ticket=ticket, policy=self.fallback, providers=self.providers)
        ctx.cache = plan.cache
        if tier.rate_limit:
            limit, policy = self._rate_headers[tier.name]
            headers: tuple[tuple[str, str], ...] = (
                ("x-request-id", plan.request_id), ("x-ai-model", chosen.id), limit,
                ("ratelimit-remaining", str(remaining if remaining > 0 else 0)),
                ("ratelimit-reset", str(-(-reset_ms // 1000))), policy)
        else:
            headers = (("x-request-id", plan.request_id), ("x-ai-model", chosen.id))
        if downgraded:
            headers += (("x-ai-routing", "downgraded"),)
        if plan.cache is not None:
            headers += (("x-ai-cache", "miss"),)
        return allowed_decision(headers, ctx, ticket)

    # ---------------------------------------------------------------- cache hits

    def exact_hit(self, plan: Plan, reply: list[Any]) -> Decision:
        """admit.lua found the request's exact entry: admitted without a reservation,
        answered from the entry (or, should the entry be unreadable, served as a miss
        that reserved nothing)."""
        admitted = self._admitted(plan, int(reply[1]), int(reply[2]), int(reply[3]),
                                  reserved=False)
        chosen = plan.selection.chosen
        assert chosen is not None
        if self.cache.hit(plan.cache, reply[4:8], "exact", chosen) is None:
            return admitted
        return self.hit_decision(plan, admitted)

    def hit_decision(self, plan: Plan, admitted: Decision) -> Decision:
        """The whole response a cache hit answers: the stored body (JSON, or SSE when the
        request streams), ``X-AI-Cache: hit`` and the admission's headers. Not
        ``allowed``: the app's handler is not called; adapters write it as it is. The
        ticket and context are kept for the hit's settlement, which the gateway runs."""
        content_type, body = self.cache.response(plan.cache)
        headers = (("content-type", content_type), ("x-ai-cache", "hit"),
                   *(h for h in admitted.headers if h[0] != "x-ai-cache"))
        return Decision(False, 200, headers, body, context=admitted.context,
                        ticket=admitted.ticket)

    def _refused_by_limit(self, plan: Plan, reply: list[Any]) -> Decision:
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

    # ---------------------------------------------------------------- without Redis

    def admit_locally(self, plan: Plan, info: RequestInfo, exc: StoreError) -> Decision:
        """Redis is unreachable: serve within the per-process allowance, or refuse (503)."""
        tier = plan.tier
        policy = tier.on_unavailable or self.config.redis.on_unavailable
        verified = self.credentials.verified(plan)
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
