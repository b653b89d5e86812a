"""The Starlette test app: the routes every adapter's test app mirrors, as Starlette views.

``make_starlette_app(config, resolver=None)`` builds it behind
:class:`~ai_saas_middleware.starlette.AISaaSMiddleware` (added with ``app.add_middleware``,
as users do), for ``tests/test_starlette.py`` and the cross-framework contract table
(``tests/test_contract.py``). ``tests/flask_app.py`` and ``tests/django_app.py`` are its
twins on the other frameworks.

    POST /ai/chat, /ai/premium/chat   OpenAI-style JSON; ``reply_usage`` sets its usage
    POST /ai/stream                   SSE ending with a usage chunk (12 + 34)
    POST /ai/stream-stalls            three SSE chunks, then stalls until the client goes
    POST /ai/boom                     raises
    POST /ai/upstream-down            502 without usage
    POST /ai/context                  reports usage itself; shows the context
    POST /ai/fallback                 ctx.aexecute falls back to the next candidate
    POST /ai/echo, /echo              the body back (AI and non-AI)
    POST /ai/rendezvous               answers once two requests are in their handlers
    GET  /, /aix                      non-AI pages
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from replies import (
    COMPLETION_TOKENS,
    PROMPT_TOKENS,
    EveryModelDown,
    FirstCandidateDown,
    chat_reply,
    completion,
    context_reply,
    sse_body,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ai_saas_middleware.starlette import AISaaSMiddleware

DEEP_JSON = b'{"a":' * 50_000 + b"1" + b"}" * 50_000  # valid JSON, too deep for json.loads


# ------------------------------------------------------------------ the app under test


async def chat(request: Request) -> Response:
    """OpenAI-style JSON; ``reply_usage`` in the body sets the usage it reports."""
    return JSONResponse(chat_reply(request.state.ai.model.id, await request.json()))


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in sse_body():
            yield chunk
            await asyncio.sleep(0)

    return StreamingResponse(chunks(), media_type="text/event-stream")


async def stream_stalls(request: Request) -> Response:
    """Three content chunks, then the provider stalls until the client goes away."""
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in sse_body()[:3]:
            yield chunk
        await asyncio.Event().wait()
        yield b"never sent"  # pragma: no cover

    return StreamingResponse(chunks(), media_type="text/event-stream")


async def boom(request: Request) -> Response:
    raise RuntimeError("the handler has a bug")


async def upstream_down(request: Request) -> Response:
    return JSONResponse({"error": {"type": "upstream_error", "message": "provider is down"}},
                        status_code=502)


async def context(request: Request) -> Response:
    """Reads the context both ways and reports usage itself (``answered_by`` picks a model)."""
    ctx = request.state.ai
    return JSONResponse(context_reply(ctx, await request.json(),
                                      same_object=request.scope["ai_saas"] is ctx))


async def fallback(request: Request) -> Response:
    """The first candidate's provider call fails; ``ctx.aexecute`` moves on."""
    provider = FirstCandidateDown()
    return JSONResponse(provider.reply(await request.state.ai.aexecute(provider.acall)))


async def all_down(request: Request) -> Response:
    """Every candidate's provider call fails: ``ctx.aexecute`` raises NoHealthyModel."""
    return JSONResponse(await request.state.ai.aexecute(EveryModelDown().acall))


async def ai_echo(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")


async def rendezvous(request: Request) -> Response:
    """Answers only once two requests are inside their handlers at the same time."""
    arrived: list[str] = request.app.state.arrived
    arrived.append(request.state.ai.request_id)
    if len(arrived) == 2:
        request.app.state.both_in.set()
    await asyncio.wait_for(request.app.state.both_in.wait(), 5)
    return JSONResponse(completion("x", "Hi!", PROMPT_TOKENS, COMPLETION_TOKENS))


async def home(request: Request) -> Response:
    return PlainTextResponse("home")


async def echo(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")


ROUTES = [
    Route("/ai/chat", chat, methods=["POST"]),
    Route("/ai/premium/chat", chat, methods=["POST"]),
    Route("/ai/stream", stream, methods=["POST"]),
    Route("/ai/stream-stalls", stream_stalls, methods=["POST"]),
    Route("/ai/boom", boom, methods=["POST"]),
    Route("/ai/upstream-down", upstream_down, methods=["POST"]),
    Route("/ai/context", context, methods=["POST"]),
    Route("/ai/fallback", fallback, methods=["POST"]),
    Route("/ai/all-down", all_down, methods=["POST"]),
    Route("/ai/echo", ai_echo, methods=["POST"]),
    Route("/ai/rendezvous", rendezvous, methods=["POST"]),
    Route("/", home),
    Route("/echo", echo, methods=["POST"]),
    Route("/aix", home),
]


def make_starlette_app(config: Any, resolver: Any = None) -> Starlette:
    """The test app behind the middleware, configured with ``config`` (and ``resolver``)."""
    app = Starlette(routes=ROUTES)
    app.state.arrived = []
    app.state.both_in = asyncio.Event()
    app.add_middleware(AISaaSMiddleware, config=config, resolver=resolver)
    return app


def middleware_of(app: Starlette) -> AISaaSMiddleware:
    """The middleware instance inside a Starlette app (building its stack if need be)."""
    if app.middleware_stack is None:
        app.middleware_stack = app.build_middleware_stack()
    node: Any = app.middleware_stack
    while not isinstance(node, AISaaSMiddleware):
        node = node.app
    return node
