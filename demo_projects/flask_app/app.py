"""The Flask demo: the Starlette demo's SaaS app, on Flask, behind the AISaaS extension.

    GET  /                 a non-AI page (passes through: no Redis call)
    POST /ai/chat          JSON chat completion via the provider, with fallback
    POST /ai/chat/stream   the same, streamed as server-sent events (stream_with_context)
    POST /ai/premium/chat  like /ai/chat, on an endpoint that requires quality >= 0.8
    GET  /ai-saas/usage    the caller's own usage this month (the extension's blueprint)

The app never counts tokens itself: the middleware reads the provider's ``usage`` from
the JSON body or the final SSE chunk, prices it exactly and writes the event. It uses
the Starlette demo's configuration (the same tenants, tiers and keys).

Run it: ``ai-saas demo --framework flask`` (starts Redis, the provider, this app and
traffic), or ``PROVIDER_URL=... flask --app demo_projects.flask_app.app run`` (or
``gunicorn 'demo_projects.flask_app.app:create_app()'``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from flask import Flask, Response, g, stream_with_context

from ai_saas_middleware import ModelProfile
from ai_saas_middleware.flask import AI_SAAS_CONFIG, AI_SAAS_REDIS_URL, AISaaS, usage_blueprint

CONFIG = Path(__file__).resolve().parent.parent / "starlette_app" / "ai-saas-config.yaml"


def create_app(config: Any = CONFIG, provider_url: str | None = None,
               redis_url: str | None = None) -> Flask:
    """The demo app; ``provider_url`` is the OpenAI-compatible base URL to call."""
    base = (provider_url or os.environ.get("PROVIDER_URL", "http://127.0.0.1:8001")).rstrip("/")
    client = httpx.Client(base_url=base, timeout=30)

    app = Flask(__name__)
    app.config[AI_SAAS_CONFIG] = config
    if redis_url:
        app.config[AI_SAAS_REDIS_URL] = redis_url
    AISaaS(app)
    app.register_blueprint(usage_blueprint, url_prefix="/ai-saas")

    @app.get("/")
    def home() -> str:
        return "<h1>Demo SaaS</h1><p>POST /ai/chat with your API key.</p>"

    def provider_body(model: ModelProfile, stream: bool) -> dict[str, Any]:
        ctx = g.ai
        return {**ctx.body, "model": model.id, "max_tokens": ctx.max_output_tokens,
                "stream": stream}

    def chat() -> Response:
        def call(model: ModelProfile) -> httpx.Response:
            reply = client.post("/v1/chat/completions", json=provider_body(model, False))
            reply.raise_for_status()
            return reply

        try:
            reply = g.ai.execute(call)
        except httpx.HTTPError:
            return Response(b'{"error":{"type":"upstream_error","code":"upstream_failed",'
                            b'"message":"every model failed"}}', status=502,
                            content_type="application/json")
        return Response(reply.content, content_type="application/json")

    @app.post("/ai/chat/stream")
    def chat_stream() -> Response:
        upstream = client.send(client.build_request(
            "POST", "/v1/chat/completions", json=provider_body(g.ai.model, True)), stream=True)

        def relay() -> Iterator[bytes]:
            try:
                yield from upstream.iter_raw()
            finally:  # also when the client went away and the server closed the body
                upstream.close()

        # stream_with_context: g.ai and the request stay usable while the body streams.
        return Response(stream_with_context(relay()),
                        content_type="text/event-stream; charset=utf-8")

    app.add_url_rule("/ai/chat", "chat", chat, methods=["POST"])
    app.add_url_rule("/ai/premium/chat", "premium_chat", chat, methods=["POST"])
    return app
