"""The Django test app: the routes of ``tests/starlette_app.py``, as Django views.

``make_django_app(config, resolver=None)`` gives ``(wsgi_app, asgi_app)``: a real
``WSGIHandler`` and a real ``ASGIHandler`` whose ``AISaaSMiddleware`` was built with that
configuration, for any test (and the cross-framework contract table) to drive with
httpx's WSGI/ASGI transports or raw ASGI calls. ``build_django_apps`` also gives Django's
own ``Client`` and ``AsyncClient`` built the same way, and the gateways (to close).
Importing this module configures Django with ``tests/django_settings.py`` (unless
``DJANGO_SETTINGS_MODULE`` names other settings).

Routes (as in the Starlette app; ``/ai/*`` are AI endpoints in ``conftest.BASE_CONFIG``):

    POST /ai/chat, /ai/premium/chat   OpenAI-style JSON completion (``reply_usage`` sets
                                      the usage it reports; default 12 + 34)
    POST /ai/stream                   SSE from an async iterator, final usage chunk 12 + 34
    POST /ai/stream-sync              the same from a sync iterator
    POST /ai/stream-stalls            three SSE chunks, then stalls until the client goes
    POST /ai/boom                     raises RuntimeError
    POST /ai/upstream-down            502 JSON without usage
    POST /ai/context                  reads request.ai, reports usage 5 + 7 itself
    POST /ai/fallback                 ctx.execute: the first candidate fails
    POST /ai/echo                     the body as received
    GET  /                            non-AI page;  POST /echo  non-AI echo;  GET /aix
    GET  /ai-saas/usage/              include("ai_saas_middleware.django.urls")
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import django
from django.conf import settings

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_settings")
django.setup()

from django.core.handlers.asgi import ASGIHandler, ASGIRequest  # noqa: E402
from django.core.handlers.wsgi import WSGIHandler  # noqa: E402
from django.http import (  # noqa: E402
    HttpRequest,
    HttpResponse,
    JsonResponse,
    StreamingHttpResponse,
)
from django.test import AsyncClient, Client, override_settings  # noqa: E402
from django.urls import include, path  # noqa: E402
from replies import EveryModelDown, FirstCandidateDown, chat_reply, context_reply, sse_body  # noqa: E402

from ai_saas_middleware.django.middleware import get_gateway  # noqa: E402
from ai_saas_middleware.gateway import AsyncGateway, Gateway  # noqa: E402

KEEPALIVE_S, KEEPALIVE_MAX = 0.02, 5000  # /ai/stream-stalls under WSGI (no test times it)


# ------------------------------------------------------------------ users, without a database


@dataclass
class TenantUser:
    """What ``request.user`` is for a signed-in user of the test app."""

    pk: int
    tenant: str
    is_authenticated: bool = True
    is_anonymous: bool = False


USERS = {7: TenantUser(7, "initech"), 8: TenantUser(8, "globex")}


class TenantUserBackend:
    """An authentication backend over ``USERS`` (``get_user`` is all a session needs)."""

    def authenticate(self, request: HttpRequest, **credentials: Any) -> None:
        return None

    def get_user(self, user_id: int) -> TenantUser | None:
        return USERS.get(user_id)

    async def aget_user(self, user_id: int) -> TenantUser | None:
        return USERS.get(user_id)


def session_cookie(user_id: int) -> dict[str, str]:
    """The cookie of a session signed in as ``user_id`` (the signed-cookies engine)."""
    from django.contrib.auth import BACKEND_SESSION_KEY, SESSION_KEY
    from django.contrib.sessions.backends.signed_cookies import SessionStore

    session = SessionStore()
    session[SESSION_KEY] = str(user_id)
    session[BACKEND_SESSION_KEY] = "django_app.TenantUserBackend"
    session.save()
    assert session.session_key is not None
    return {settings.SESSION_COOKIE_NAME: session.session_key}


def tenant_of_user(request: HttpRequest) -> str | None:
    """A resolver: the signed-in user's tenant (None: the API key decides)."""
    user: Any = request.user  # type: ignore[attr-defined]
    return user.tenant if user.is_authenticated else None


async def atenant_of_user(request: HttpRequest) -> str | None:
    """The async twin of :func:`tenant_of_user` (Django >= 5.0's ``request.auser()``)."""
    user: Any = await request.auser()  # type: ignore[attr-defined]
    return user.tenant if user.is_authenticated else None


# ------------------------------------------------------------------ views


def chat(request: HttpRequest) -> HttpResponse:
    ctx = request.ai  # type: ignore[attr-defined]
    return JsonResponse(chat_reply(ctx.model.id, json.loads(request.body)))


def stream(request: HttpRequest) -> StreamingHttpResponse:
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in sse_body():
            yield chunk
            await asyncio.sleep(0)

    return StreamingHttpResponse(chunks(), content_type="text/event-stream")


def stream_sync(request: HttpRequest) -> StreamingHttpResponse:
    def chunks() -> Iterator[bytes]:
        yield from sse_body()

    return StreamingHttpResponse(chunks(), content_type="text/event-stream")


def stream_stalls(request: HttpRequest) -> StreamingHttpResponse:
    """Three content chunks, then the provider stalls until the client goes away.

    Under ASGI an async iterator that waits (Django cancels it when the client leaves);
    under WSGI a sync one that sends keep-alive comments until the server stops asking
    (Django would consume an async iterator whole before sending a byte).
    """
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in sse_body()[:3]:
            yield chunk
        await asyncio.Event().wait()
        yield b"never sent"  # pragma: no cover

    def sync_chunks() -> Iterator[bytes]:
        yield from sse_body()[:3]
        pause = threading.Event()
        for _ in range(KEEPALIVE_MAX):
            pause.wait(KEEPALIVE_S)
            yield b": still thinking\n\n"

    body = chunks() if isinstance(request, ASGIRequest) else sync_chunks()
    return StreamingHttpResponse(body, content_type="text/event-stream")


def boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("the handler has a bug")


def upstream_down(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"error": {"type": "upstream_error", "message": "provider is down"}},
                        status=502)


def context(request: HttpRequest) -> HttpResponse:
    """Reads the context and reports usage itself (``answered_by`` picks a model)."""
    ctx = request.ai  # type: ignore[attr-defined]
    return JsonResponse(context_reply(ctx, json.loads(request.body),
                                      same_object=request.ai is ctx))  # type: ignore[attr-defined]


def fallback(request: HttpRequest) -> HttpResponse:
    """The first candidate's provider call fails; ``ctx.execute`` moves on."""
    provider = FirstCandidateDown()
    return JsonResponse(provider.reply(request.ai.execute(provider)))  # type: ignore[attr-defined]


def all_down(request: HttpRequest) -> HttpResponse:
    """Every candidate's provider call fails: ``ctx.execute`` raises NoHealthyModel."""
    return JsonResponse(request.ai.execute(EveryModelDown()))  # type: ignore[attr-defined]


def ai_echo(request: HttpRequest) -> HttpResponse:
    return HttpResponse(request.body, content_type="application/octet-stream")


def home(request: HttpRequest) -> HttpResponse:
    return HttpResponse("home", content_type="text/plain")


def echo(request: HttpRequest) -> HttpResponse:
    """Non-AI echo; says whether anything had read the body before the view."""
    untouched = not request._read_started  # type: ignore[attr-defined]
    response = HttpResponse(request.read(), content_type="application/octet-stream")
    response["x-body-untouched"] = "yes" if untouched else "no"
    return response


urlpatterns = [
    path("ai/chat", chat),
    path("ai/premium/chat", chat),
    path("ai/stream", stream),
    path("ai/stream-sync", stream_sync),
    path("ai/stream-stalls", stream_stalls),
    path("ai/boom", boom),
    path("ai/upstream-down", upstream_down),
    path("ai/context", context),
    path("ai/fallback", fallback),
    path("ai/all-down", all_down),
    path("ai/echo", ai_echo),
    path("", home),
    path("echo", echo),
    path("aix", home),
    path("ai-saas/", include("ai_saas_middleware.django.urls")),
]

# ------------------------------------------------------------------ factories


def ai_saas_setting(config: Any, resolver: Callable[..., Any] | None = None) -> dict[str, Any]:
    return {"CONFIG": config, "RESOLVER": resolver}


@dataclass
class DjangoApps:
    """What :func:`build_django_apps` built; all share one sync and one async gateway."""

    wsgi: WSGIHandler
    asgi: ASGIHandler
    client: Client  # Django's test client: the WSGI path
    aclient: AsyncClient  # the ASGI path
    gateway: Gateway
    agateway: AsyncGateway


def build_django_apps(config: Any, resolver: Callable[..., Any] | None = None,
                      **client_kwargs: Any) -> DjangoApps:
    """The test app behind ``AISaaSMiddleware`` with ``config``, every way to call it.

    ``resolver`` maps the Django request to a tenant id (sync or async), as the
    ``RESOLVER`` of ``AI_SAAS``. Each handler builds its middleware chain here, under
    ``override_settings``, and keeps that configuration afterwards.
    """
    with override_settings(AI_SAAS=ai_saas_setting(config, resolver)):
        client, aclient = Client(**client_kwargs), AsyncClient(**client_kwargs)
        client.handler.load_middleware()
        aclient.handler.load_middleware(is_async=True)
        return DjangoApps(WSGIHandler(), ASGIHandler(), client, aclient, get_gateway(False),
                          get_gateway(True))


def make_django_app(config: Any, resolver: Callable[..., Any] | None = None
                    ) -> tuple[WSGIHandler, ASGIHandler]:
    """``(wsgi_app, asgi_app)``: the test app behind ``AISaaSMiddleware`` with ``config``.

    Real Django handlers, to drive with httpx's ``WSGITransport`` / ``ASGITransport`` or
    raw ASGI calls. Settings are otherwise those of ``tests/django_settings.py``.
    """
    apps = build_django_apps(config, resolver)
    return apps.wsgi, apps.asgi
