"""Starlette (and FastAPI) adapter.

::

    from starlette.applications import Starlette
    from ai_saas_middleware.starlette import AISaaSMiddleware

    app = Starlette(routes=[...])
    app.add_middleware(AISaaSMiddleware, config="ai-saas-config.yaml")

    async def chat(request):
        ctx = request.state.ai            # also request.scope["ai_saas"]
        reply = await ctx.aexecute(lambda model: call_provider(model.id, ...))
        ...

Every request to a path under ``endpoints`` is tied to a tenant (``Authorization:
Bearer <key>`` or ``X-API-Key``), held to its tier, given the cheapest model that
meets its needs, and recorded with its exact cost in the usage stream; every other
request passes through untouched, with no Redis call.

For apps that authenticate users themselves, ``resolver`` maps a
:class:`starlette.requests.Request` to a tenant id (sync or async). Add this
middleware *after* (inside) the authentication middleware so ``request.user`` is set.

This is the pure ASGI middleware of :mod:`ai_saas_middleware.asgi` (no
``BaseHTTPMiddleware``: streamed bodies pass through chunk by chunk, and every Redis
call awaits on ``redis.asyncio``), with the resolver taking a Request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

try:
    from starlette.requests import Request
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError("ai_saas_middleware.starlette needs Starlette: "
                      "pip install 'ai-saas-middleware[starlette]'") from exc

from . import asgi
from .gateway import AsyncGateway

__all__ = ["AISaaSMiddleware", "admin_app"]

RequestResolver = Callable[[Request], Awaitable[str | None] | str | None]


class AISaaSMiddleware(asgi.AISaaSMiddleware):
    """:class:`ai_saas_middleware.asgi.AISaaSMiddleware` whose resolver takes a Request."""

    def __init__(self, app: asgi.ASGIApp, config: asgi.ConfigSource | None = None, *,
                 gateway: AsyncGateway | None = None, resolver: RequestResolver | None = None,
                 redis_url: str | None = None):
        super().__init__(app, config, gateway=gateway, resolver=_on_scope(resolver),
                         redis_url=redis_url)


def _on_scope(resolver: RequestResolver | None) -> asgi.Resolver | None:
    """The ASGI adapter's ``scope -> tenant`` from a ``Request -> tenant`` resolver (sync
    or async: the adapter awaits what it returns when that is awaitable)."""
    if resolver is None:
        return None
    request_resolver = resolver
    return lambda scope: request_resolver(Request(scope))


def admin_app(config: asgi.ConfigSource | None = None, *, gateway: AsyncGateway | None = None,
              resolver: RequestResolver | None = None, redis_url: str | None = None) -> Any:
    """The tenant-facing admin endpoints, to mount: ``GET /usage`` (the caller's usage).

    ::

        gateway = AsyncGateway("ai-saas-config.yaml")
        app.add_middleware(AISaaSMiddleware, gateway=gateway)
        app.mount("/ai-saas", admin_app(gateway=gateway))

    (The dashboard joins it when it lands.)
    """
    from starlette.routing import Route, Router

    if gateway is None:
        if config is None:
            raise TypeError("admin_app needs config= or gateway=")
        gateway = AsyncGateway(config, redis_url=redis_url)
    usage = asgi.UsageApp(gateway, _on_scope(resolver))
    return Router(routes=[Route("/usage", usage)])

