"""What the test apps of every framework answer: OpenAI-style replies and streams.

Framework-free, so ``starlette_app``, ``flask_app`` and ``django_app`` build the same
bytes from one definition, and the contract table can compare them.
"""

from __future__ import annotations

import json
from typing import Any

CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "Say hello in five words."}],
                        "max_tokens": 32}
# The reply's usage as the provider reports it, unless a request asks for other figures.
PROMPT_TOKENS, COMPLETION_TOKENS = 12, 34
SSE_WORDS = ["Hello", " there", ",", " my", " good", " friend", "!"]


def sse_event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def sse_body(words: list[str] = SSE_WORDS) -> list[bytes]:
    """An OpenAI-style stream: content chunks, a final usage chunk, then [DONE]."""
    chunks = [sse_event({"object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": {"content": word}}]})
              for word in words]
    chunks.append(sse_event({"object": "chat.completion.chunk", "choices": [],
                             "usage": {"prompt_tokens": PROMPT_TOKENS,
                                       "completion_tokens": COMPLETION_TOKENS,
                                       "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}}))
    chunks.append(b"data: [DONE]\n\n")
    return chunks


def completion(model_id: str, text: str, prompt_tokens: int, completion_tokens: int
               ) -> dict[str, Any]:
    return {"id": "chatcmpl-test", "object": "chat.completion", "model": model_id,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
