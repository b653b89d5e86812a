"""Pure ASGI middleware: any ASGI app (Starlette, FastAPI, Quart, ...).

::

    from ai_saas_middleware.asgi import AISaaSMiddleware
    app = AISaaSMiddleware(app, config="ai-saas-config.yaml")

Requests that match no configured endpoint, and every non-HTTP scope, go straight to
the app: no Redis call, no body read, nothing wrapped. For an AI request the body is
read once (at most ``http.maxBodyBytes``, else 413), admitted by the core in one
``redis.asyncio`` round trip, and replayed to the app; the context is put at
``scope["ai_saas"]`` and ``scope["state"]["ai"]`` (``request.state.ai`` in Starlette).
The response passes through unchanged but for the ``X-Request-ID``, ``X-AI-Model`` and
RateLimit headers; streamed bodies are forwarded chunk by chunk. When the app is done,
after the last byte was handed to the server, the request is settled in one more
round trip, also when the client went away half way (what was produced is billed).

``resolver``, when given, maps the scope to a tenant id (for apps whose users are
already authenticated, e.g. from ``scope["user"]``); it may be a coroutine function.
When it returns None, the API key decides.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Union, cast

from .config import Config, EndpointConfig
from .errors import RequestRefused
from .gateway import AsyncGateway
from .types import Decision, RequestInfo
from .usage import meter_for

__all__ = ["AISaaSMiddleware"]

log = logging.getLogger("ai_saas_middleware")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Resolver = Callable[[Scope], Awaitable[str | None] | str | None]
ConfigSource = Union[Config, Mapping[str, Any], str, "os.PathLike[str]"]


_HEADER_NAMES: dict[str, bytes] = {}


def _header_name(name: str) -> bytes:
    """A header name as bytes; the core's few names are encoded once."""
    encoded = _HEADER_NAMES.get(name)
    if encoded is None:
        encoded = name.encode("latin-1")
        if len(_HEADER_NAMES) < 64:
            _HEADER_NAMES[name] = encoded
    return encoded


def scope_headers(scope: Scope) -> dict[str, str]:
    """The request headers of an HTTP scope, with lower-case names (ASGI gives them so)."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


async def resolve_tenant(resolver: Resolver, scope: Scope) -> str | None:
    """What ``resolver`` (sync, async, or returning an awaitable) says of ``scope``."""
    tenant = resolver(scope)
    if inspect.isawaitable(tenant):
        tenant = await tenant
    return tenant


async def send_decision(send: Send, decision: Decision) -> None:
    """Write a refusal as a whole response."""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in decision.headers]
    headers.append((b"content-length", str(len(decision.body)).encode()))
    await send({"type": "http.response.start", "status": decision.status, "headers": headers})
    await send({"type": "http.response.body", "body": decision.body, "more_body": False})


class AISaaSMiddleware:
    """ASGI middleware that makes every AI request cost-aware.

    Args:
        app: the ASGI app to wrap.
        config: a YAML path, a dict or a loaded Config (ignored when ``gateway`` is given).
        gateway: an :class:`AsyncGateway` to share between apps.
        resolver: ``scope -> tenant id | None`` (sync or async), for apps that already
            know their user; None defers to the API key.
        redis_url: overrides ``redis.url``.
    """

    def __init__(self, app: ASGIApp, config: ConfigSource | None = None, *,
                 gateway: AsyncGateway | None = None, resolver: Resolver | None = None,
                 redis_url: str | None = None):
        if gateway is None:
            if config is None:
                raise TypeError("AISaaSMiddleware needs config= (a YAML path, a dict or a "
                                "Config) or gateway=")
            # Checked at the lifespan's start-up, not here: Starlette builds its middleware
            # on a server's first request, which may be a plain page (no Redis call).
            gateway = AsyncGateway(config, redis_url=redis_url, startup_check=False)
            self._check_at_startup = True
        else:
            self._check_at_startup = False  # the caller built it, and checked then
        self.app = app
        self.gateway = gateway
        self.resolver = resolver
        self.max_body_bytes = gateway.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and self._check_at_startup:
                self._check_at_startup = False
                # One PING off the loop (at most redis.connectTimeout), as the server starts.
                await asyncio.to_thread(self.gateway.check_redis)
            await self.app(scope, receive, send)
            return
        endpoint = self.gateway.endpoint_for(scope["method"], scope["path"])
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        await self._ai_request(scope, receive, send, endpoint)

    async def _read_body(self, receive: Receive, headers: Mapping[str, str]
                         ) -> bytes | Decision | None:
        """The whole body, a refusal (413/400), or None when the client left."""
        declared = self.gateway.declared_length(headers)
        if isinstance(declared, Decision):
            return declared
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return self.gateway.too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _ai_request(self, scope: Scope, receive: Receive, send: Send,
                          endpoint: EndpointConfig) -> None:
        headers = scope_headers(scope)
        body = await self._read_body(receive, headers)
        if body is None:
            return
        if isinstance(body, Decision):
            await send_decision(send, body)
            return
        tenant = None if self.resolver is None else await resolve_tenant(self.resolver, scope)
        info = RequestInfo(scope["method"], scope["path"], headers, body, tenant)
        decision = await self.gateway.admit(info, endpoint)
        if not decision.allowed:
            await send_decision(send, decision)
            return
        ctx, ticket = decision.context, decision.ticket
        assert ctx is not None and ticket is not None
        scope["ai_saas"] = ctx
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["ai"] = ctx

        extra = [(_header_name(k), v.encode("latin-1")) for k, v in decision.headers]
        meter = meter_for(ctx)
        replayed = False
        disconnected = False

        async def replay_receive() -> Message:
            nonlocal replayed, disconnected
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            message = await receive()
            # Servers also answer http.disconnect once the response is complete (e.g. to
            # Starlette's disconnect listener): only a hang-up before the end counts.
            if message["type"] == "http.disconnect" and not meter.complete:
                disconnected = True
            return message

        async def metered_send(message: Message) -> None:
            nonlocal disconnected
            kind = message["type"]
            if kind == "http.response.start":
                raw = list(message.get("headers", ()))
                content_type = b""
                for name, value in raw:
                    if name.lower() == b"content-type":
                        content_type = value
                        break
                meter.start(message["status"], content_type.decode("latin-1"))
                raw += extra
                message = {**message, "headers": raw}
            elif kind == "http.response.body":
                meter.feed(message.get("body", b""))
                if not message.get("more_body", False):
                    meter.finish()
            try:
                await send(message)
            except OSError:
                disconnected = True
                raise

        failed = False
        try:
            await self.app(scope, replay_receive, metered_send)
        except RequestRefused as exc:
            # ctx.execute / ctx.complete ran out of models (NoHealthyModel): its 503, or
            # routing.defaultResponse, is the answer, not a 500 (unless the response had
            # begun: then it is too late to answer anything else).
            failed = True
            if meter.status:
                raise
            await send_decision(metered_send, cast(Decision, exc.decision))
        except BaseException as exc:
            # Cancelled (the client went away, a cancel scope, a shutdown): billed for what
            # was produced, as a hang-up; anything else is the app failing.
            disconnected = disconnected or isinstance(exc, asyncio.CancelledError)
            failed = not disconnected
            raise
        finally:
            outcome = meter.outcome(failed=failed or ctx.failed, disconnected=disconnected)
            try:
                # Cancellation-safe: a settlement cut short is spooled, then replayed.
                await self.gateway.settle(ticket, outcome, ctx)
            except Exception:
                log.exception("settling request %s failed", ticket.request_id)


class UsageApp:
    """ASGI app answering ``GET`` with the caller's own usage this month (JSON).

    Credentials as for AI requests (API key, or ``resolver``). Mount it where the
    tenant's clients can reach it, e.g. ``/ai-saas/usage``.
    """

    def __init__(self, gateway: AsyncGateway, resolver: Resolver | None = None):
        self.gateway = gateway
        self.resolver = resolver

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        tenant = None if self.resolver is None else await resolve_tenant(self.resolver, scope)
        info = RequestInfo(scope["method"], scope["path"], scope_headers(scope), b"", tenant)
        await send_decision(send, await self.gateway.usage(info))

