"""The Starlette demo: a small SaaS app whose AI endpoints go through the middleware.

    GET  /                 a non-AI page (passes through: no Redis call)
    POST /ai/chat          JSON chat completion via the provider, with fallback
    POST /ai/chat/stream   the same, streamed as server-sent events
    POST /ai/premium/chat  like /ai/chat, on an endpoint that requires quality >= 0.8

The app never counts tokens itself: the middleware reads the provider's ``usage``
from the JSON body or the final SSE chunk, prices it exactly and writes the event.

Run it: ``ai-saas demo`` (starts Redis, the provider, this app and traffic), or
``PROVIDER_URL=... uvicorn demo_projects.starlette_app.app:app``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ai_saas_middleware import ModelProfile
from ai_saas_middleware.starlette import AISaaSMiddleware

CONFIG = Path(__file__).with_name("ai-saas-config.yaml")


def create_app(config: Any = CONFIG, provider_url: str | None = None,
               redis_url: str | None = None) -> Starlette:
    """The demo app; ``provider_url`` is the OpenAI-compatible base URL to call."""
    base = (provider_url or os.environ.get("PROVIDER_URL", "http://127.0.0.1:8001")).rstrip("/")
    client = httpx.AsyncClient(base_url=base, timeout=30)

    async def home(request: Request) -> Response:
        return HTMLResponse("<h1>Demo SaaS</h1><p>POST /ai/chat with your API key.</p>")

    def provider_body(request: Request, model: ModelProfile, stream: bool) -> dict[str, Any]:
        ctx = request.state.ai
        return {**ctx.body, "model": model.id, "max_tokens": ctx.max_output_tokens,
                "stream": stream}

    async def chat(request: Request) -> Response:
        ctx = request.state.ai

        async def call(model: ModelProfile) -> httpx.Response:
            reply = await client.post("/v1/chat/completions",
                                      json=provider_body(request, model, False))
            reply.raise_for_status()
            return reply

        try:
            reply = await ctx.aexecute(call)
        except httpx.HTTPError:
            return JSONResponse({"error": {"type": "upstream_error", "code": "upstream_failed",
                                           "message": "every model failed"}}, status_code=502)
        return Response(reply.content, media_type="application/json")

    async def chat_stream(request: Request) -> Response:
        ctx = request.state.ai
        upstream = client.build_request("POST", "/v1/chat/completions",
                                        json=provider_body(request, ctx.model, True))
        reply = await client.send(upstream, stream=True)

        async def relay() -> Any:
            try:
                async for chunk in reply.aiter_raw():
                    yield chunk
            finally:
                await reply.aclose()

        return StreamingResponse(relay(), media_type="text/event-stream")

    app = Starlette(routes=[
        Route("/", home),
        Route("/ai/chat", chat, methods=["POST"]),
        Route("/ai/chat/stream", chat_stream, methods=["POST"]),
        Route("/ai/premium/chat", chat, methods=["POST"]),
    ])
    app.add_middleware(AISaaSMiddleware, config=config, redis_url=redis_url)
    return app


app = create_app()
