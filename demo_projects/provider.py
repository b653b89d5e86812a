"""A local stand-in for an OpenAI-compatible provider, served over real HTTP.

``POST /v1/chat/completions`` answers like OpenAI's chat completions: a JSON body with
``usage``, or, with ``"stream": true``, server-sent events ending with a usage chunk
(as with ``stream_options.include_usage``) and ``data: [DONE]``. Token counts are
deterministic (words of the prompt and of the reply), so the demo's figures can be
checked. ``"model": "model-broken"`` answers 503, to show fallbacks.

``"pause_after_chunks": N`` (a field of the stand-in's own, passed on by the demo apps with
the rest of the body) makes a stream stop after its first N content chunks and send only
SSE comments (keep-alives, no text) until its client hangs up, for at most ``PAUSE_S``
seconds (then the rest follows as usual). A client that hangs up once it has read those N
chunks is then billed for exactly them, however fast each hop notices the hang-up: an
ASGI server sees the closed socket at once, a WSGI server (Werkzeug) only when it writes,
and the keep-alives give it something to write.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

LATENCY_S = 0.002
PAUSE_S = 10.0  # how long a paused stream waits for its client to hang up
KEEPALIVE_S = 0.02  # between the keep-alives of a paused stream


def prompt_tokens(body: dict[str, Any]) -> int:
    words = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            words += len(content.split())
    return words + 3 * len(body.get("messages") or []) + 1


def reply_words(body: dict[str, Any]) -> list[str]:
    max_tokens = int(body.get("max_tokens") or 64)
    model = str(body.get("model", "model"))
    words = f"This is {model} answering with a short and deterministic reply".split()
    return (words * 8)[: max(1, min(max_tokens, 40))]


async def chat_completions(request: Request) -> Any:
    body = await request.json()
    model = body.get("model", "model-small")
    if model == "model-broken":
        return JSONResponse({"error": {"message": "upstream overloaded"}}, status_code=503)
    await asyncio.sleep(LATENCY_S)
    words = reply_words(body)
    usage = {"prompt_tokens": prompt_tokens(body), "completion_tokens": len(words),
             "total_tokens": prompt_tokens(body) + len(words)}
    created = int(time.time())
    if not body.get("stream"):
        return JSONResponse({
            "id": "chatcmpl-demo", "object": "chat.completion", "created": created,
            "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": " ".join(words)}}],
            "usage": usage,
        })

    pause_after = body.get("pause_after_chunks")

    async def events() -> Any:
        for i, word in enumerate(words):
            if i == pause_after:
                # Cancelled here when the client hangs up (Starlette stops the stream on
                # http.disconnect, or the write of a keep-alive fails).
                deadline = time.monotonic() + PAUSE_S
                while time.monotonic() < deadline:
                    yield ": keep-alive\n\n"
                    await asyncio.sleep(KEEPALIVE_S)
            chunk = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
                     "choices": [{"index": 0, "delta": {"content": (" " if i else "") + word}}]}
            yield f"data: {json.dumps(chunk)}\n\n"
            await asyncio.sleep(0)
        yield f"data: {json.dumps({'id': 'chatcmpl-demo', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


app = Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"])])
