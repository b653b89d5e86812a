"""Anthropic's Messages API.

``POST {baseUrl}/v1/messages`` with ``x-api-key`` and ``anthropic-version: 2023-06-01``.
Messages come in OpenAI's form: ``{"role": "system"}`` messages become the ``system``
field (several are joined with a blank line), the rest go as they are. ``max_tokens``
is required by the API, and always sent. Usage: ``usage.input_tokens`` and
``usage.output_tokens``; in a stream, ``message_start`` carries the input tokens and
``message_delta`` the output tokens so far (the last one is the total), text comes in
``content_block_delta`` events of type ``text_delta``, ``message_stop`` ends it, and an
``error`` event (``overloaded_error``, ...) is the provider failing mid-stream::

    providers:
      - id: anthropic
        kind: anthropic
        baseUrl: https://api.anthropic.com
        apiKeyEnv: ANTHROPIC_API_KEY
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..config import ProviderConfig
from .base import MalformedReply, Message, ProviderError, Reply, _StreamState
from .http import Dialect, HTTPProvider, StreamDecoder

__all__ = ["ANTHROPIC_VERSION", "AnthropicDialect", "AnthropicProvider"]

ANTHROPIC_VERSION = "2023-06-01"
# Anthropic's error types that are its own trouble (its 429 / 5xx statuses in-stream).
_FAILURE_ERRORS = ("overloaded_error", "api_error", "rate_limit_error", "timeout_error")


def _tokens(usage: Any, key: str) -> int | None:
    value = usage.get(key) if isinstance(usage, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _AnthropicDecoder(StreamDecoder):
    def event(self, name: str, data: str, state: _StreamState) -> str | None:
        try:
            payload = json.loads(data)
        except ValueError:
            raise MalformedReply(f"{state.provider}: the stream of {state.model} sent an "
                                 "event that is not JSON", provider=state.provider,
                                 model=state.model) from None
        if not isinstance(payload, Mapping):
            return None
        kind = payload.get("type") or name
        if kind == "content_block_delta":
            delta = payload.get("delta")
            if isinstance(delta, Mapping) and delta.get("type") == "text_delta":
                text = delta.get("text")
                return text if isinstance(text, str) else None
        elif kind == "message_start":
            message = payload.get("message")
            if isinstance(message, Mapping):
                usage = message.get("usage")
                state.prompt_tokens = _tokens(usage, "input_tokens")
                state.completion_tokens = _tokens(usage, "output_tokens")
                if isinstance(message.get("model"), str):
                    state.model = message["model"]
        elif kind == "message_delta":
            output = _tokens(payload.get("usage"), "output_tokens")
            if output is not None:
                state.completion_tokens = output
            delta = payload.get("delta")
            if isinstance(delta, Mapping) and delta.get("stop_reason"):
                state.finish_reason = delta["stop_reason"]
            state.raw = payload
        elif kind == "message_stop":
            state.done = True
        elif kind == "error":
            error = payload.get("error")
            error_type = error.get("type") if isinstance(error, Mapping) else None
            message = Dialect.error_message(payload) or "an error event"
            raise ProviderError(f"{state.provider}: the stream of {state.model} failed: "
                                f"{error_type}: {message[:300]}", provider=state.provider,
                                model=state.model, failure=error_type in _FAILURE_ERRORS)
        return None


class AnthropicDialect(Dialect):
    """The Messages API's wire format."""

    path: ClassVar[str] = "/v1/messages"

    def headers(self, api_key: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "anthropic-version": ANTHROPIC_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def body(self, model: str, messages: Sequence[Message], max_tokens: int,
             params: Mapping[str, Any], stream: bool) -> dict[str, Any]:
        system = [m.get("content") for m in messages if m.get("role") == "system"]
        body: dict[str, Any] = {
            "model": model, "max_tokens": max_tokens,
            "messages": [dict(m) for m in messages if m.get("role") != "system"]}
        if system:
            texts = [s for s in system if isinstance(s, str)]
            body["system"] = "\n\n".join(texts) if len(texts) == len(system) else [
                block for s in system for block in (
                    [{"type": "text", "text": s}] if isinstance(s, str) else list(s or ()))]
        body.update(params)
        if stream:
            body["stream"] = True
        return body

    def reply(self, data: Any, model: str) -> Reply:
        blocks = data["content"]
        text = "".join(b["text"] for b in blocks
                       if isinstance(b, Mapping) and b.get("type") == "text")
        usage = data.get("usage")
        return Reply(text=text, prompt_tokens=_tokens(usage, "input_tokens"),
                     completion_tokens=_tokens(usage, "output_tokens"),
                     model=data.get("model") or model,
                     finish_reason=data.get("stop_reason"), raw=data)

    def decoder(self) -> StreamDecoder:
        return _AnthropicDecoder()


class AnthropicProvider(HTTPProvider):
    """An Anthropic Messages API provider (``kind: anthropic``); see the module docstring."""

    kind: ClassVar[str] = "anthropic"

    def __init__(self, config: ProviderConfig, api_key: str | None = None) -> None:
        super().__init__(config, AnthropicDialect(), api_key)
