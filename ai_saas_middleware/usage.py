"""Usage from request and response bodies. Pure; no I/O.

- :func:`~ai_saas_middleware.estimate.estimate_prompt_tokens` (re-exported): tokens of a
  request body, estimated; see :mod:`ai_saas_middleware.estimate`.
- :class:`ResponseMeter`: fed the response body as it passes (JSON or SSE), it finds the
  provider's own ``usage`` (an OpenAI-compatible JSON body, or the final usage chunk of
  an SSE stream) and counts the text produced, without changing or holding back a byte.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .estimate import estimate_prompt_tokens, estimate_tokens, text_chars
from .types import Outcome

__all__ = ["ResponseMeter", "estimate_prompt_tokens", "estimate_tokens", "usage_from"]


def usage_from(payload: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens of an OpenAI-compatible ``usage`` object, if present."""
    if not isinstance(payload, Mapping):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, Mapping):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if (isinstance(prompt, int) and isinstance(completion, int) and not isinstance(prompt, bool)
            and not isinstance(completion, bool) and prompt >= 0 and completion >= 0):
        return prompt, completion
    return None


def _completion_chars(payload: Any) -> int:
    if not isinstance(payload, Mapping):
        return 0
    total = 0
    choices = payload.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, Mapping):
                continue
            for part in ("delta", "message"):
                holder = choice.get(part)
                if isinstance(holder, Mapping):
                    total += text_chars(holder.get("content"))
            total += text_chars(choice.get("text"))
    return total


class ResponseMeter:
    """Watches one response body go by and says what it used.

    Call :meth:`start` with the status and content type, :meth:`feed` with each body
    chunk as it is sent, and :meth:`outcome` when the response ended (or the client
    left). JSON bodies are kept up to ``max_buffer`` bytes to be parsed at the end;
    SSE streams are parsed event by event, so a long stream holds only one line.
    """

    __slots__ = (
        "_buffer",
        "_json",
        "_size",
        "_sse",
        "complete",
        "completion_chars",
        "length_declared",
        "max_buffer",
        "provider_usage",
        "status",
    )

    def __init__(self, max_buffer: int = 1_048_576):
        self.max_buffer = max_buffer
        self.status = 0
        self._sse = False
        self._json = False
        self._buffer: list[bytes] = []
        self._size = 0
        self.provider_usage: tuple[int, int] | None = None
        self.completion_chars = 0
        self.complete = False
        self.length_declared = False

    def start(self, status: int, content_type: str, content_length: str | None = None) -> None:
        """The response began: its status, content type and declared length, if any."""
        self.status = status
        self.length_declared = content_length is not None
        content_type = content_type.lower()
        self._sse = content_type.startswith("text/event-stream")
        self._json = "json" in content_type

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._sse:
            self._buffer.append(chunk)
            if b"\n" in chunk:
                self._scan_sse(final=False)
        elif self._json and self._size <= self.max_buffer:
            self._buffer.append(chunk)
            self._size += len(chunk)

    def _scan_sse(self, final: bool) -> None:
        data = b"".join(self._buffer)
        lines = data.split(b"\n")
        rest = b"" if final else lines.pop()
        self._buffer = [rest] if rest else []
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if not payload or payload == b"[DONE]":
                continue
            try:
                event = json.loads(payload)
            except (ValueError, RecursionError):  # too deeply nested
                continue
            usage = usage_from(event)
            if usage is not None:
                self.provider_usage = usage
            self.completion_chars += _completion_chars(event)

    def finish(self) -> None:
        """The last byte was sent."""
        self.complete = True

    def outcome(self, *, failed: bool = False, disconnected: bool = False) -> Outcome:
        if self._sse:
            self._scan_sse(final=True)
        elif self._json and self._buffer and self._size <= self.max_buffer:
            try:
                payload = json.loads(b"".join(self._buffer))
            except (ValueError, RecursionError):
                payload = None
            self.provider_usage = usage_from(payload)
            self.completion_chars = _completion_chars(payload)
            self._buffer = []
        return Outcome(
            status=self.status or 500,
            provider_usage=self.provider_usage,
            completion_chars=self.completion_chars,
            failed=failed,
            disconnected=disconnected or (not self.complete and not failed),
        )
