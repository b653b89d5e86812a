"""OpenAI-compatible chat completions: OpenAI, vLLM, Ollama, a LiteLLM proxy, most hosts.

``POST {baseUrl}/chat/completions`` with ``Authorization: Bearer <key>`` (no header when
the provider has no ``apiKeyEnv``). A stream asks for ``stream_options:
{include_usage: true}``, so the last chunk before ``data: [DONE]`` carries the
provider's real usage (a server that ignores the option leaves the counts ``None``)::

    providers:
      - id: openai
        kind: openai
        baseUrl: https://api.openai.com/v1
        apiKeyEnv: OPENAI_API_KEY
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..config import ProviderConfig
from .base import MalformedReply, Message, ProviderError, Reply, _StreamState
from .http import Dialect, HTTPProvider, StreamDecoder

__all__ = ["OpenAIDialect", "OpenAIProvider"]


def _tokens(usage: Any, key: str) -> int | None:
    value = usage.get(key) if isinstance(usage, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _OpenAIDecoder(StreamDecoder):
    def event(self, name: str, data: str, state: _StreamState) -> str | None:
        if data.strip() == "[DONE]":
            state.done = True
            return None
        try:
            chunk = json.loads(data)
        except ValueError:
            raise MalformedReply(f"{state.provider}: the stream of {state.model} sent an "
                                 "event that is not JSON", provider=state.provider,
                                 model=state.model) from None
        if not isinstance(chunk, Mapping):
            return None
        if "error" in chunk:  # some servers (vLLM, LiteLLM) report a failure in-stream
            message = Dialect.error_message(chunk) or "an error event"
            raise ProviderError(f"{state.provider}: the stream of {state.model} failed: "
                                f"{message[:300]}", provider=state.provider, model=state.model)
        if isinstance(chunk.get("model"), str):
            state.model = chunk["model"]
        usage = chunk.get("usage")
        if usage:
            state.prompt_tokens = _tokens(usage, "prompt_tokens")
            state.completion_tokens = _tokens(usage, "completion_tokens")
            state.raw = chunk
        text = None
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, Mapping):
                continue
            if choice.get("finish_reason"):
                state.finish_reason = choice["finish_reason"]
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, Mapping) else None
            if isinstance(content, str) and content and choice.get("index", 0) == 0:
                text = content
        return text


class OpenAIDialect(Dialect):
    """The chat completions wire format."""

    path: ClassVar[str] = "/chat/completions"

    def headers(self, api_key: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return headers

    def body(self, model: str, messages: Sequence[Message], max_tokens: int,
             params: Mapping[str, Any], stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": list(messages),
                                "max_tokens": max_tokens, **params}
        if stream:
            body["stream"] = True
            options = dict(body.get("stream_options") or {})
            options["include_usage"] = True
            body["stream_options"] = options
        return body

    def reply(self, data: Any, model: str) -> Reply:
        choice = data["choices"][0]
        content = choice["message"].get("content")
        usage = data.get("usage")
        return Reply(text=content if isinstance(content, str) else "",
                     prompt_tokens=_tokens(usage, "prompt_tokens"),
                     completion_tokens=_tokens(usage, "completion_tokens"),
                     model=data.get("model") or model,
                     finish_reason=choice.get("finish_reason"), raw=data)

    def decoder(self) -> StreamDecoder:
        return _OpenAIDecoder()


class OpenAIProvider(HTTPProvider):
    """An OpenAI-compatible provider (``kind: openai``); see the module docstring."""

    kind: ClassVar[str] = "openai"

    def __init__(self, config: ProviderConfig, api_key: str | None = None) -> None:
        super().__init__(config, OpenAIDialect(), api_key)
