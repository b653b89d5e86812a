"""Token estimates of request bodies and of text. Pure; no I/O.

- :func:`estimate_prompt_tokens`: tokens of an OpenAI-style request body (``messages``,
  ``prompt`` or ``input``), estimated at 4 characters a token plus a small overhead per
  message; used to reserve quota and check a context window, and always marked
  ``estimate`` when it ends up billed.
- :func:`estimate_tokens`: tokens of a number of characters of text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["estimate_prompt_tokens", "estimate_tokens", "text_chars"]

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REQUEST = 3


def estimate_tokens(chars: int) -> int:
    """Tokens in ``chars`` characters of text (rounded up)."""
    return -(-chars // CHARS_PER_TOKEN)


def text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...] or ["a", "b"]
        total = 0
        for part in content:
            if isinstance(part, str):
                total += len(part)
            elif isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str):
                    total += len(text)
        return total
    return 0


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Estimated prompt tokens of an OpenAI-style request body (0 when it has no prompt)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        tokens = TOKENS_PER_REQUEST
        for message in messages:
            if isinstance(message, Mapping):
                tokens += TOKENS_PER_MESSAGE + estimate_tokens(text_chars(message.get("content")))
        return tokens
    for key in ("prompt", "input"):
        if key in body:
            return TOKENS_PER_REQUEST + estimate_tokens(text_chars(body[key]))
    return 0
