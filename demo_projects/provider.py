"""A local stand-in for an OpenAI-compatible provider, served over real HTTP.

``POST /v1/chat/completions`` answers like OpenAI's chat completions: a JSON body with
``usage``, or, with ``"stream": true``, server-sent events ending with a usage chunk
(as with ``stream_options.include_usage``) and ``data: [DONE]``. Token counts are
deterministic (words of the prompt and of the reply), so the demo's figures can be
checked. ``"model": "model-broken"`` answers 503, to show fallbacks.
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

    async def events() -> Any:
        for i, word in enumerate(words):
            chunk = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
                     "choices": [{"index": 0, "delta": {"content": (" " if i else "") + word}}]}
            yield f"data: {json.dumps(chunk)}\n\n"
            await asyncio.sleep(0)
        yield f"data: {json.dumps({'id': 'chatcmpl-demo', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


app = Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"])])
