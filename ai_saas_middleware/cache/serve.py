"""The bytes of the cache: what is stored from a response, and what a hit answers. Pure.

Stored: the OpenAI chat completion JSON the app answered, as it sent it; or, when it
streamed (SSE, ``chat.completion.chunk`` events), the same completion assembled from the
chunks: the content deltas joined, the last ``finish_reason``, the final usage. A stream
that did not end (no ``finish_reason``, or no ``data: [DONE]``) is not stored.

Served: the stored JSON as it is; or, when the new request streams (``"stream": true``),
replayed as SSE in OpenAI's shape: one chunk with the role and the whole content, one with
the ``finish_reason``, the usage chunk when ``stream_options.include_usage`` asks for it,
then ``data: [DONE]``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ..usage import ResponseMeter

__all__ = ["MAX_CAPTURE_BYTES", "CapturingMeter", "entry_body", "hit_body"]

log = logging.getLogger("ai_saas_middleware")

MAX_CAPTURE_BYTES = 1_048_576  # a response larger than this is not stored

_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


class CapturingMeter(ResponseMeter):
    """A :class:`~ai_saas_middleware.usage.ResponseMeter` that also keeps the body (up to
    ``limit`` bytes) for the cache, and hands it to ``sink`` when the response ended
    complete: ``sink(is_sse, body, status)``."""

    __slots__ = ("_kept", "_kept_size", "_limit", "_sink")

    def __init__(self, sink: Any, limit: int = MAX_CAPTURE_BYTES):
        super().__init__()
        self._sink = sink
        self._limit = limit
        self._kept: list[bytes] | None = []
        self._kept_size = 0

    def feed(self, chunk: bytes) -> None:
        kept = self._kept
        if kept is not None and chunk:
            self._kept_size += len(chunk)
            if self._kept_size > self._limit:
                self._kept = None  # too large to store: kept no more
            else:
                kept.append(chunk)
        super().feed(chunk)

    def outcome(self, *, failed: bool = False, disconnected: bool = False) -> Any:
        result = super().outcome(failed=failed, disconnected=disconnected)
        kept, self._kept = self._kept, None
        if kept is not None and self.complete and not failed and not result.disconnected:
            try:
                self._sink(self._sse, b"".join(kept), self.status)
            except Exception:  # the cache must never break a response
                log.exception("a response could not be kept for the cache")
        return result


def entry_body(is_sse: bool, raw: bytes) -> bytes | None:
    """The completion JSON to store for a response body; None when it is not a complete
    chat completion (an error body, a truncated stream, something else)."""
    if not is_sse:
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError, UnicodeDecodeError):
            return None
        if not isinstance(payload, dict) or "error" in payload or not isinstance(
                payload.get("choices"), list) or len(payload["choices"]) != 1:
            return None
        choice = payload["choices"][0]
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or \
                message.get("tool_calls") or message.get("function_call"):
            return None  # only a text answer is replayed (never an action)
        return raw
    return _assembled(raw)


def _assembled(raw: bytes) -> bytes | None:
    content: list[str] = []
    finish: str | None = None
    done = False
    head: dict[str, Any] = {}
    usage: Any = None
    role = "assistant"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(event, dict):
            return None
        for name in ("id", "created", "model", "system_fingerprint"):
            if name in event and name not in head:
                head[name] = event[name]
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                return None  # several choices: not a shape this replays
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict) or delta.get("tool_calls") or delta.get(
                    "function_call"):
                return None
            if isinstance(delta.get("role"), str):
                role = delta["role"]
            if isinstance(delta.get("content"), str):
                content.append(delta["content"])
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    if not done:
        return None  # a stream cut short
    completion: dict[str, Any] = {"id": head.get("id", "chatcmpl-cache"),
                                  "object": "chat.completion"}
    for name in ("created", "model", "system_fingerprint"):
        if name in head:
            completion[name] = head[name]
    completion["choices"] = [{"index": 0, "finish_reason": finish or "stop",
                              "message": {"role": role, "content": "".join(content)}}]
    if usage is not None:
        completion["usage"] = usage
    return _COMPACT.encode(completion).encode()


def _sse(payload: Any) -> bytes:
    return b"data: " + _COMPACT.encode(payload).encode() + b"\n\n"


def hit_body(stored: bytes, *, stream: bool, include_usage: bool = False
             ) -> tuple[str, bytes]:
    """(content type, body) answering a hit: the stored JSON, or its SSE replay."""
    if not stream:
        return "application/json", stored
    completion = json.loads(stored)
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    head = {"id": completion.get("id", "chatcmpl-cache"), "object": "chat.completion.chunk"}
    for name in ("created", "model", "system_fingerprint"):
        if name in completion:
            head[name] = completion[name]
    chunks = [
        _sse({**head, "choices": [{"index": 0, "finish_reason": None, "delta": {
            "role": message.get("role", "assistant"), "content": message.get("content") or ""}}]}),
        _sse({**head, "choices": [{"index": 0, "delta": {},
                                   "finish_reason": choice.get("finish_reason", "stop")}]}),
    ]
    if include_usage and completion.get("usage") is not None:
        chunks.append(_sse({**head, "choices": [], "usage": completion["usage"]}))
    chunks.append(b"data: [DONE]\n\n")
    return "text/event-stream; charset=utf-8", b"".join(chunks)
