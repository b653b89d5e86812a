"""The framework-agnostic core: admission before the handler, settlement after.

:class:`Gateway` (sync, redis-py) and :class:`AsyncGateway` (asyncio, ``redis.asyncio``)
are twins with the same method names. Neither holds logic of its own: each sequences the
same steps, which do no I/O, and runs (or awaits) the Redis calls they build::

    decision = gateway.admit(info)               # one EVALSHA of admit.lua
    if decision.allowed:
        try: ... run the handler with decision.context ...
        finally: gateway.settle(decision.ticket, outcome, decision.context)   # one EVALSHA

The steps live in modules of their own: who is calling in
:mod:`~ai_saas_middleware.credentials`; the admission plan (body, model, the admit.lua
call, its reply as a :class:`~ai_saas_middleware.types.Decision`, local admission while
Redis is unreachable) in :mod:`~ai_saas_middleware.admission`; the usage event and the
settle.lua call in :mod:`~ai_saas_middleware.settlement`; the usage endpoint in
:mod:`~ai_saas_middleware.usage_query`. A settlement Redis cannot take now is spooled
(:mod:`~ai_saas_middleware.spool`) and replayed in order.

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
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping
from typing import Any

from . import background
from .admission import ADMIT_ATTEMPTS as ADMIT_ATTEMPTS
from .admission import QUOTA_TTL_S as QUOTA_TTL_S
from .admission import WINDOW_MS as WINDOW_MS
from .admission import Admission, Plan
from .admission import ScriptCall as ScriptCall
from .admission import _request_ids as _request_ids
from .admission import _this_month as _this_month
from .breakers import BreakerBoard
from .config import Config, EndpointConfig, load_config
from .context import RequestContext, Ticket
from .credentials import STORED_KEY_PREFIX as STORED_KEY_PREFIX
from .credentials import Credentials
from .credentials import hash_api_key as hash_api_key
from .credentials import new_stored_key as new_stored_key
from .credentials import stored_key_tenant as stored_key_tenant
from .errors import (
    BudgetExceeded,
    NoEligibleModel,
    NoHealthyModel,
    QuotaExceeded,
    RateLimited,
    RequestRefused,
    StoreError,
    StoreRefused,
    UnknownTenant,
)
from .inputs import declared_length, too_large
from .leases import LeaseKeeper
from .observed import ObservedStats
from .pricebook import PriceBook
from .providers import build_providers
from .settlement import Settlement, usage_counts
from .spool import Spool
from .startup import check_redis_at_startup
from .store.keys import KeySchema
from .store.redis import AsyncRedisStore, RedisStore
from .types import Decision, Outcome, RequestInfo
from .usage_query import UsageQuery
from .watch import Watch

__all__ = ["AsyncGateway", "Gateway"]

log = logging.getLogger("ai_saas_middleware")


class _Core:
    """What the twins share: the configuration and the steps; no I/O."""

    leases: LeaseKeeper  # set by each twin, with the store its renewals use
    store: Any  # the twin's RedisStore or AsyncRedisStore
    admission: Admission  # set by each twin, once its store and leases exist

    def __init__(self, config: Config | Mapping[str, Any] | str | os.PathLike[str], *,
                 redis_url: str | None = None, startup_check: bool = True):
        self.config = load_config(config)
        cfg = self.config
        self.redis_url = redis_url or cfg.redis.url or os.environ.get("REDIS_URL") or None
        self.keys = KeySchema(cfg.redis.key_prefix, cfg.redis.shards)
        self._endpoints = cfg.endpoints
        self.max_body_bytes = cfg.http.max_body_bytes
        self.spool = Spool(cfg.redis.spool_dir or Spool.default_dir(cfg.redis.key_prefix),
                           self.keys)
        self.credentials = Credentials(cfg)
        self.settlement = Settlement(cfg)
        self.usage_query = UsageQuery(cfg, self.keys, self.credentials)
        # One PING now, so that a wrong URL or a Redis not running shows at start-up (one
        # WARNING), not at the first AI request; waits at most redis.connectTimeout. (The
        # ASGI middleware, built on a server's first request, checks at its lifespan
        # start-up instead: a gateway built for a plain page must not call Redis.)
        self._startup_check = (check_redis_at_startup(cfg, self.redis_url) if startup_check
                               else None)

    def _start(self, store: Any, leases: LeaseKeeper, sync_store: Callable[[], Any],
               owns_sync_store: bool) -> None:
        """The twin's store and lease keeper, the breakers' view (its thread's sync store:
        ``sync_store()``), and the admission that uses them."""
        self.store = store
        self.leases = leases
        cfg = self.config
        self.breakers = BreakerBoard(cfg.routing.circuit_breaker, self.keys)
        self.prices = PriceBook(cfg, self.keys)
        self.observed = ObservedStats(self.keys)
        # One thread keeps all three current (pub/sub; nothing while idle).
        self.watch = Watch(sync_store, owns_sync_store, self.breakers, self.prices,
                           self.observed)
        self.admission = Admission(self.config, self.keys, self.credentials, leases, store,
                                   self.breakers, self.prices, self.observed)
        # The provider layer, when configured (reads each apiKeyEnv now; no connection).
        self.providers = build_providers(cfg) if cfg.providers else None
        self.admission.providers = self.providers
        self.allowance = self.admission.allowance

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

    # ---------------------------------------------------------------- settlement

    def _settle_call(self, ticket: Ticket, outcome: Outcome,
                     ctx: RequestContext | None) -> ScriptCall:
        """The request's settle.lua call; its lease ends here (settle.lua releases what
        Redis holds of the reservation)."""
        self.leases.drop(ticket.request_id)
        call, sample = self.settlement.call(ticket, outcome, ctx)
        if sample is not None:
            self.watch.record(*sample)
        return call

    def _store_call(self, ticket: Ticket, outcome: Outcome, ctx: RequestContext | None
                    ) -> ScriptCall | None:
        """The cache_store.lua call for a miss whose response may be cached (or a
        semantic hit's cache_touch.lua), else None."""
        cache = self.admission.cache
        plan = ctx.cache if ctx is not None else None
        if cache is None or plan is None or ctx is None:
            return None
        try:
            prompt, completion, _source = usage_counts(ticket, ctx, outcome)
            call: ScriptCall | None = cache.store_call(plan, ticket, ctx, outcome,
                                                       (prompt, completion))
            return call
        except Exception:  # the cache must never cost a settlement
            log.exception("the response of %s could not be prepared for the cache",
                          ticket.request_id)
            return None

    @staticmethod
    def _hit_outcome() -> Outcome:
        return Outcome(status=200)

    def _semantic_steps(self, plan: Plan, decision: Decision
                        ) -> Generator[ScriptCall, Any, Decision]:
        """After admission, for a request the cache may answer: the semantic lookup on an
        exact miss (one round trip, which usually brings a hit's body along; one more for
        it when it did not). Without I/O, for both gateway twins: each script call is
        yielded, its reply sent back (its error thrown in); returns the decision, a hit's
        when one was found."""
        cache, found = self.admission.cache, plan.cache
        if found.hit is None and decision.allowed and cache.wants_lookup(found):
            try:
                entry, fields = cache.choose(found, (yield cache.lookup_call(found)))
                if entry is not None and fields is None:  # not among the bodies sent along
                    fields = yield cache.fetch_call(found, entry)
            except StoreError as exc:
                log.warning("cache lookup of %s skipped: %s", plan.request_id, exc)
                fields = None
            except Exception:  # a bug in the cache must never cost the request
                log.exception("cache lookup of %s failed; served as a miss", plan.request_id)
                fields = None
            chosen = plan.selection.chosen
            if fields and chosen is not None and cache.hit(found, fields, "semantic", chosen):
                decision = self.admission.hit_decision(plan, decision)
        return decision

    # ---------------------------------------------------------------- background jobs

    def _job_info(self, tenant_id: str, endpoint: str | None, body: Mapping[str, Any] | None,
                  headers: Mapping[str, str] | None) -> tuple[RequestInfo, EndpointConfig]:
        matched = self.endpoint_for("POST", endpoint) if endpoint else None
        if endpoint and matched is None:
            raise ValueError(f"{endpoint!r} matches no configured endpoint")
        chosen = matched or EndpointConfig(path=endpoint or "<job>")
        raw = json.dumps(dict(body or {})).encode()
        # (A job is given a context to run its own call: never answered from the cache.)
        hdrs = {"content-type": "application/json", "cache-control": "no-cache, no-store",
                **{k.lower(): v for k, v in (headers or {}).items()}}
        return RequestInfo("POST", chosen.path, hdrs, raw, tenant_id=tenant_id), chosen

    @staticmethod
    def _raise_refusal(decision: Decision) -> None:
        code = decision.error_code
        if code == "rate_limit_exceeded":
            raise RateLimited(decision)
        if code == "quota_exceeded":
            raise QuotaExceeded(decision)
        if code == "budget_exceeded":
            raise BudgetExceeded(decision)
        if code == "no_healthy_model":
            raise NoHealthyModel(decision)
        if code == "no_eligible_model":
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
        store = RedisStore(self.config.redis, self.redis_url)
        # The watch thread has a store of its own: its reads must not tell the requests'
        # store that Redis is back while it refuses writes (OOM, READONLY), nor its
        # failures that Redis is down.
        self._start(store, LeaseKeeper(self.config.quota.reservation_timeout_s,
                                       lambda: self.store, spool=self.spool),
                    lambda: RedisStore(self.config.redis, self.redis_url),
                    owns_sync_store=True)

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
        admission = self.admission
        plan = admission.prepare(info, endpoint)
        if isinstance(plan, Decision):
            return plan
        for _attempt in range(ADMIT_ATTEMPTS):
            try:
                reply = self._run(admission.call(plan))
                decision = admission.interpret(plan, info, reply)
            except StoreError as exc:
                return admission.admit_locally(plan, info, exc)
            if decision is not None:
                if plan.cache is not None and decision.ticket is not None:
                    decision = self._cached(plan, decision)
                return decision
        raise StoreError("admission did not settle (the tier or the month kept moving)")

    def _cached(self, plan: Plan, decision: Decision) -> Decision:
        """:meth:`_semantic_steps` run here, and a hit's settlement, here and now (a sync
        app has no loop to run it on later: the client waits for it, about one round
        trip; it saved a model call)."""
        steps = self._semantic_steps(plan, decision)
        try:
            call = next(steps)
            while True:
                try:
                    reply = self._run(call)
                except Exception as exc:  # (the steps decide what an error means)
                    call = steps.throw(exc)
                else:
                    call = steps.send(reply)
        except StopIteration as done:
            decision = done.value
        if plan.cache.hit is not None:
            assert decision.ticket is not None
            self.settle(decision.ticket, self._hit_outcome(), decision.context)
        return decision

    def usage(self, info: RequestInfo) -> Decision:
        """The caller's own usage this month (credentials as for admission), as JSON."""
        call = self.usage_query.call(info)
        if isinstance(call, Decision):
            return call
        try:
            return self.usage_query.report(call[0], self._run(call[1]))
        except StoreError:
            return self.usage_query.unavailable()

    def settle(self, ticket: Ticket, outcome: Outcome, ctx: RequestContext | None = None) -> None:
        """Record the request's usage and settle its quota. One Redis round trip.

        Never raises for Redis trouble: an event that cannot be written now is spooled
        to disk and replayed, in order, when Redis is back.
        """
        call = self._settle_call(ticket, outcome, ctx)
        store = self._store_call(ticket, outcome, ctx)
        try:
            if self.spool.pending and not self.store.health.is_down():
                self.spool.replay(self._run)  # older events first: the stream stays in order
            if not self.spool.pending:
                try:
                    if store is None:
                        self._run(call)
                    else:  # the cache's store rides in the same round trip
                        settled = self.store.run_scripts([call, store])[0]
                        if isinstance(settled, StoreError):
                            raise settled
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
        self.watch.close()
        self.leases.close()
        self.store.close()


class AsyncGateway(_Core):
    """Asyncio twin of :class:`Gateway` (ASGI apps); every Redis call awaits."""

    def __init__(self, config: Config | Mapping[str, Any] | str | os.PathLike[str], *,
                 redis_url: str | None = None, startup_check: bool = True):
        super().__init__(config, redis_url=redis_url, startup_check=startup_check)
        # Renewals run in the keeper's thread, on a sync store of their own.
        self._start(AsyncRedisStore(self.config.redis, self.redis_url),
                    LeaseKeeper(self.config.quota.reservation_timeout_s,
                                lambda: RedisStore(self.config.redis, self.redis_url),
                                owns_store=True, spool=self.spool),
                    lambda: RedisStore(self.config.redis, self.redis_url),
                    owns_sync_store=True)

    async def _run(self, call: ScriptCall) -> Any:
        return await self.store.run_script(*call)

    async def admit(self, info: RequestInfo, endpoint: EndpointConfig | None = None) -> Decision:
        """See :meth:`Gateway.admit`."""
        endpoint = endpoint or self.endpoint_for(info.method, info.path)
        if endpoint is None:
            raise ValueError(f"{info.method} {info.path} is not an AI endpoint")
        admission = self.admission
        plan = admission.prepare(info, endpoint)
        if isinstance(plan, Decision):
            return plan
        for _attempt in range(ADMIT_ATTEMPTS):
            try:
                reply = await self._run(admission.call(plan))
                decision = admission.interpret(plan, info, reply)
            except StoreError as exc:
                return admission.admit_locally(plan, info, exc)
            except asyncio.CancelledError:
                # The client went away (or a scope was cancelled) with admit.lua's reply on
                # its way: whatever it reserved is given back by a task of its own (the
                # lease would release it too, only later).
                background.start(self._release(plan))
                raise
            if decision is not None:
                if plan.cache is not None and decision.ticket is not None:
                    decision = await self._cached(plan, decision)
                return decision
        raise StoreError("admission did not settle (the tier or the month kept moving)")

    async def _cached(self, plan: Plan, decision: Decision) -> Decision:
        """See :meth:`Gateway._cached`; a hit is settled by a task of its own, off the
        client's path (``wait_for_settlements()`` waits for it)."""
        steps = self._semantic_steps(plan, decision)
        try:
            call = next(steps)
            while True:
                try:
                    reply = await self._run(call)
                except Exception as exc:  # (a cancellation is not thrown in: it goes on)
                    call = steps.throw(exc)
                else:
                    call = steps.send(reply)
        except StopIteration as done:
            decision = done.value
        if plan.cache.hit is not None:
            assert decision.ticket is not None
            background.start(self.settle(decision.ticket, self._hit_outcome(),
                                         decision.context))
        return decision

    async def _release(self, plan: Plan) -> None:
        try:
            await self._run(self.admission.release_call(plan))
        except StoreError as exc:
            log.warning("reservation of cancelled request %s left to its lease: %s",
                        plan.request_id, exc)

    async def usage(self, info: RequestInfo) -> Decision:
        """See :meth:`Gateway.usage`."""
        call = self.usage_query.call(info)
        if isinstance(call, Decision):
            return call
        try:
            return self.usage_query.report(call[0], await self._run(call[1]))
        except StoreError:
            return self.usage_query.unavailable()

    async def settle(self, ticket: Ticket, outcome: Outcome,
                     ctx: RequestContext | None = None) -> None:
        """See :meth:`Gateway.settle`.

        Whatever interrupts it, the settlement is written or spooled, exactly once: a
        cancellation spools it before the ``CancelledError`` goes on.
        """
        call = self._settle_call(ticket, outcome, ctx)
        store = self._store_call(ticket, outcome, ctx)
        try:
            if self.spool.pending and not self.store.health.is_down():
                await self.spool.areplay(self._run)
            if not self.spool.pending:
                try:
                    if store is None:
                        await self._run(call)
                    else:  # the cache's store rides in the same round trip
                        settled = (await self.store.run_scripts([call, store]))[0]
                        if isinstance(settled, StoreError):
                            raise settled
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
        self.watch.close()
        self.leases.close()
        await self.store.close()

