"""The Flask twin of ``tests/starlette_app.py``: same routes, same replies.

``make_flask_app(config, resolver=None)`` builds it behind :class:`AISaaS`, so a
cross-framework contract test can run one table of scenarios through both. The JSON
replies are rendered the way Starlette's ``JSONResponse`` renders them (compact,
UTF-8), and the payloads come from ``replies``, so the bytes are the same.

    POST /ai/chat, /ai/premium/chat   OpenAI-style JSON; ``reply_usage`` sets its usage
    POST /ai/stream                   SSE ending with a usage chunk (stream_with_context)
    POST /ai/stream-stalls            three chunks, then keep-alive comments until the
                                      client goes away (the server's write fails)
    POST /ai/boom                     raises
    POST /ai/upstream-down            502 without usage
    POST /ai/context                  reports usage itself; shows the context
    POST /ai/fallback                 ctx.execute falls back to the next candidate
    POST /ai/echo, /echo              the body back (AI and non-AI)
    GET  /, /aix                      non-AI pages ("/" also says whether g.ai is set)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response, g, request, stream_with_context
from replies import EveryModelDown, FirstCandidateDown, chat_reply, context_reply, sse_body

from ai_saas_middleware.flask import AI_SAAS_CONFIG, AISaaS

# Pacing of /ai/stream-stalls' keep-alive comments (no test asserts on time).
KEEPALIVE_S = 0.02
KEEPALIVE_MAX = 5000


def json_response(payload: Any, status: int = 200) -> Response:
    """JSON bytes exactly as Starlette's JSONResponse renders them."""
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, indent=None,
                      separators=(",", ":")).encode("utf-8")
    return Response(body, status=status, content_type="application/json")


def make_flask_app(config: dict[str, Any], resolver: Callable[..., Any] | None = None,
                   **app_config: Any) -> Flask:
    """The test app behind the extension; ``app_config`` goes to ``app.config``."""
    app = Flask(__name__)
    app.config.update(SECRET_KEY="test", **app_config)
    app.config[AI_SAAS_CONFIG] = config

    def chat() -> Response:
        return json_response(chat_reply(g.ai.model.id, request.get_json()))

    def stream() -> Response:
        def chunks() -> Iterator[bytes]:
            assert g.ai is not None  # the context is there while the body streams
            yield from sse_body()

        return Response(stream_with_context(chunks()),
                        content_type="text/event-stream; charset=utf-8")

    def stream_stalls() -> Response:
        def chunks() -> Iterator[bytes]:
            yield from sse_body()[:3]
            pause = threading.Event()
            for _ in range(KEEPALIVE_MAX):  # until a write fails: the client went away
                pause.wait(KEEPALIVE_S)
                yield b": still thinking\n\n"

        return Response(chunks(), content_type="text/event-stream; charset=utf-8")

    def boom() -> Response:
        raise RuntimeError("the handler has a bug")

    def upstream_down() -> Response:
        return json_response({"error": {"type": "upstream_error",
                                        "message": "provider is down"}}, 502)

    def context() -> Response:
        ctx = g.ai
        return json_response(context_reply(
            ctx, request.get_json(), same_object=request.environ["ai_saas.context"] is ctx))

    def fallback() -> Response:
        provider = FirstCandidateDown()
        return json_response(provider.reply(g.ai.execute(provider)))

    def all_down() -> Response:
        return json_response(g.ai.execute(EveryModelDown()))

    def echo() -> Response:
        return Response(request.get_data(), content_type="application/octet-stream")

    def home() -> Response:
        return Response("home" if g.ai is None else "g.ai is set",
                        content_type="text/plain; charset=utf-8")

    for path, view in (("/ai/chat", chat), ("/ai/premium/chat", chat), ("/ai/stream", stream),
                       ("/ai/stream-stalls", stream_stalls), ("/ai/boom", boom),
                       ("/ai/upstream-down", upstream_down), ("/ai/context", context),
                       ("/ai/fallback", fallback), ("/ai/all-down", all_down),
                       ("/ai/echo", echo), ("/echo", echo)):
        app.add_url_rule(path, endpoint=path, view_func=view, methods=["POST"])
    app.add_url_rule("/", view_func=home)
    app.add_url_rule("/aix", endpoint="aix", view_func=home)
    AISaaS(app, resolver=resolver)
    return app
