"""The demo's views. Async: served under ASGI they run on the event loop, as the
middleware does, and the SSE relay streams chunk by chunk.

The AI views need no ``@csrf_exempt``, though the demo keeps Django's
``CsrfViewMiddleware``: a request the middleware authenticated by its API key (a header a
browser cannot add to a cross-site request) is exempt from CSRF, as Django REST framework
exempts token authentication, while one whose tenant a ``RESOLVER`` found in the session
is checked (see ``ai_saas_middleware/django/middleware.py``).

The views never count tokens: the middleware reads the provider's ``usage`` from the
JSON body or the final SSE chunk, prices it exactly and writes the event.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import httpx
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from ai_saas_middleware import ModelProfile, RequestContext

# One provider client per event loop (and provider URL): uvicorn has one loop.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, httpx.AsyncClient]] = (
    weakref.WeakKeyDictionary())


def provider() -> httpx.AsyncClient:
    """The HTTP client of the OpenAI-compatible provider, for the running loop."""
    url = str(settings.PROVIDER_URL).rstrip("/")
    clients = _clients.setdefault(asyncio.get_running_loop(), {})
    if url not in clients:
        clients[url] = httpx.AsyncClient(base_url=url, timeout=30)
    return clients[url]


def provider_body(ctx: RequestContext, model: ModelProfile, stream: bool) -> dict[str, Any]:
    return {**ctx.body, "model": model.id, "max_tokens": ctx.max_output_tokens,
            "stream": stream}


async def home(request: HttpRequest) -> HttpResponse:
    return HttpResponse("<h1>Demo SaaS (Django)</h1><p>POST /ai/chat with your API key.</p>")


async def chat(request: HttpRequest) -> HttpResponse:
    ctx: RequestContext = request.ai  # type: ignore[attr-defined]
    client = provider()

    async def call(model: ModelProfile) -> httpx.Response:
        reply = await client.post("/v1/chat/completions", json=provider_body(ctx, model, False))
        reply.raise_for_status()
        return reply

    try:
        reply = await ctx.aexecute(call)  # falls back along ctx.candidates
    except httpx.HTTPError:
        return JsonResponse({"error": {"type": "upstream_error", "code": "upstream_failed",
                                       "message": "every model failed"}}, status=502)
    return HttpResponse(reply.content, content_type="application/json")


async def chat_stream(request: HttpRequest) -> StreamingHttpResponse:
    ctx: RequestContext = request.ai  # type: ignore[attr-defined]
    client = provider()
    upstream = await client.send(
        client.build_request("POST", "/v1/chat/completions",
                             json=provider_body(ctx, ctx.model, True)), stream=True)

    async def relay() -> Any:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:
            await upstream.aclose()

    return StreamingHttpResponse(relay(), content_type="text/event-stream")
