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


# ------------------------------------------------------------------ what the views do
# The frameworks' views differ in how they get the request's body and context; what
# they do with them is here, once, so the contract table compares the adapters and not
# three copies of a view.


# How many times each test app's /ai/chat view ran (the response cache's tests read it:
# a hit must not call the view).
CHAT_CALLS: list[int] = [0]


def chat_reply(model_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """``/ai/chat``: a completion by ``model_id``; ``reply_usage`` in the body sets its
    usage (default 12 + 34)."""
    CHAT_CALLS[0] += 1
    prompt, completion_ = body.get("reply_usage", [PROMPT_TOKENS, COMPLETION_TOKENS])
    return completion(model_id, "Hello there, my good friend!", prompt, completion_)


def context_reply(ctx: Any, body: dict[str, Any], same_object: bool) -> dict[str, Any]:
    """``/ai/context``: reports usage 5 + 7 itself (``answered_by`` in the body names the
    model that answered) and shows what the context holds; ``same_object`` says whether
    the framework's other way to the context gave this same object."""
    ctx.record_usage(5, 7, model_id=body.get("answered_by"), outcome_value="0.25")
    reply = completion(ctx.model.id, "Hi!", PROMPT_TOKENS, COMPLETION_TOKENS)
    reply["ctx"] = {"same_object": same_object, "tenant_id": ctx.tenant_id, "tier": ctx.tier,
                    "model": ctx.model.id, "request_id": ctx.request_id,
                    "max_output_tokens": ctx.max_output_tokens, "body": ctx.body,
                    "candidates": [m.id for m in ctx.candidates]}
    return reply


class FirstCandidateDown:
    """``/ai/fallback``'s provider call for ``ctx.execute`` (``acall`` for
    ``ctx.aexecute``): the first model it is given is unreachable, the next answers."""

    def __init__(self) -> None:
        self.tried: list[str] = []

    def __call__(self, model: Any) -> str:
        self.tried.append(model.id)
        if len(self.tried) == 1:
            raise ConnectionError(f"{model.id} is unreachable")
        return str(model.id)

    async def acall(self, model: Any) -> str:
        return self(model)

    def reply(self, answered: str) -> dict[str, Any]:
        """The completion by the model that answered, with the models tried in order."""
        return {**completion(answered, "Hi!", PROMPT_TOKENS, COMPLETION_TOKENS),
                "tried": self.tried}


class EveryModelDown:
    """``/ai/all-down``'s provider call: every model is unreachable, so ``ctx.execute``
    runs out of models and raises NoHealthyModel, which the adapter renders as a 503."""

    def __init__(self) -> None:
        self.tried: list[str] = []

    def __call__(self, model: Any) -> str:
        self.tried.append(model.id)
        raise ConnectionError(f"{model.id} is unreachable")

    async def acall(self, model: Any) -> str:
        return self(model)
