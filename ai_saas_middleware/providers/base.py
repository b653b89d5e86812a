"""What every provider returns and raises, and the :class:`Provider` protocol.

A provider call answers a :class:`Reply` (the text plus the provider's own usage), or,
streamed, a :class:`ProviderStream` / :class:`AsyncProviderStream`: iterate it for text
deltas; at any point ``text`` is what arrived so far and ``started`` says whether any of
it did; after the end it carries the provider's real usage. A failure is a
:class:`ProviderError`, whose ``failure`` flag is the circuit breaker's rule (see
:mod:`ai_saas_middleware.providers.failures`)::

    ProviderError               status (int | None), message, failure
    ├── ProviderTimeout         no answer within connectTimeout / readTimeout   (failure)
    ├── ProviderConnectionError refused, reset, dropped before the reply's end  (failure)
    ├── ProviderHTTPError       a non-2xx status: failure for 5xx and 429, not for 4xx
    ├── MalformedReply          a 2xx reply that is not the API's JSON          (failure)
    ├── StreamCut               a stream ended or broke before its end; ``started``,
    │                           ``text`` say what the caller already has        (failure)
    └── ProviderNotConfigured   a model names a provider ``providers:`` lacks   (not one)

The streams are lazy: ``provider.stream(...)`` sends nothing; the request goes out on
the first iteration, so a refusal before the first byte (a 503, a refused connection)
is raised by the first ``next()`` while ``stream.started`` is still False: the caller
may fall back to another model. Once ``started``, a break raises :class:`StreamCut` and
the caller bills ``stream.text`` and marks the answer truncated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import AISaaSError

__all__ = [
    "AsyncProviderStream",
    "MalformedReply",
    "Message",
    "Provider",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderHTTPError",
    "ProviderNotConfigured",
    "ProviderStream",
    "ProviderTimeout",
    "Reply",
    "StreamCut",
]

Message = Mapping[str, Any]  # an OpenAI-style chat message: {"role": ..., "content": ...}


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole reply and the provider's own count of its tokens.

    ``prompt_tokens`` / ``completion_tokens`` are ``None`` only when the provider
    reported no usage (some OpenAI-compatible servers do not); ``finish_reason`` is the
    provider's own word (``stop``, ``length``; Anthropic's ``end_turn``, ``max_tokens``);
    ``raw`` is the reply's JSON as received (for a stream: the last usage it sent)."""

    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    model: str
    finish_reason: str | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


class ProviderError(AISaaSError):
    """A provider call failed.

    Attributes:
        status: the provider's HTTP status, or ``None`` when no reply came.
        message: what happened, naming the provider and model; never an API key.
        failure: whether it counts against the model's circuit breaker (timeouts,
            connection errors, 5xx and 429 do; a client's 4xx does not).
        provider: the provider's id; model: the model called.
    """

    failure: bool = True

    def __init__(self, message: str, *, status: int | None = None, provider: str = "",
                 model: str = "", failure: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.provider = provider
        self.model = model
        if failure is not None:
            self.failure = failure


class ProviderTimeout(ProviderError):
    """No answer (or no next bytes) within the provider's configured timeout."""


class ProviderConnectionError(ProviderError):
    """The connection was refused, reset, or dropped before the reply's end."""


class ProviderHTTPError(ProviderError):
    """The provider answered a non-2xx status. ``retry_after_s``: its ``Retry-After``
    header in seconds, when it sent one as a number."""

    def __init__(self, message: str, *, status: int, provider: str = "", model: str = "",
                 retry_after_s: float | None = None) -> None:
        super().__init__(message, status=status, provider=provider, model=model,
                         failure=status >= 500 or status == 429)
        self.retry_after_s = retry_after_s


class MalformedReply(ProviderError):
    """A 2xx reply that is not the API's JSON (a broken proxy, a wrong ``baseUrl``)."""


class StreamCut(ProviderError):
    """A stream broke (or ended without the API's end marker) before its end.

    ``started`` is whether any text delta had been handed to the caller; ``text`` is
    all of it."""

    def __init__(self, message: str, *, started: bool, text: str, provider: str = "",
                 model: str = "") -> None:
        super().__init__(message, provider=provider, model=model)
        self.started = started
        self.text = text


class ProviderNotConfigured(AISaaSError, LookupError):
    """A model profile names a provider that ``providers:`` does not configure."""


class _StreamState:
    """What the twins share: the text so far and the usage the provider reported."""

    def __init__(self, provider: str, model: str) -> None:
        self.provider = provider
        self.model = model
        self.started = False
        self.done = False
        self.bytes_received = 0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.finish_reason: str | None = None
        self.raw: Mapping[str, Any] = {}
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """Every text delta received so far, joined."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def reply(self) -> Reply:
        """The whole answer as a :class:`Reply`, once the stream has ended."""
        if not self.done:
            raise RuntimeError("the stream has not ended: iterate it to the end first")
        return Reply(self.text, self.prompt_tokens, self.completion_tokens, self.model,
                     self.finish_reason, self.raw)

    def _cut(self, reason: str) -> StreamCut:
        where = "after the first text" if self.started else "before any text"
        return StreamCut(f"{self.provider}: the stream of {self.model} was cut {where}: "
                         f"{reason}", started=self.started, text=self.text,
                         provider=self.provider, model=self.model)


class ProviderStream(_StreamState):
    """A streamed reply (sync): ``for delta in stream`` yields text deltas.

    Attributes (readable at any point): ``text``, ``started`` (any delta handed out),
    ``bytes_received``, ``done``; after the end: ``prompt_tokens``,
    ``completion_tokens``, ``finish_reason``, ``raw``, and :meth:`reply`. Use it as a
    context manager, or call :meth:`close`, to free the connection when stopping early.
    """

    def __init__(self, provider: str, model: str, deltas: Iterator[str] | None = None
                 ) -> None:
        super().__init__(provider, model)
        self._deltas = deltas

    def _bind(self, deltas: Iterator[str]) -> None:
        self._deltas = deltas

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        assert self._deltas is not None
        delta = next(self._deltas)
        self.started = True
        self._parts.append(delta)
        return delta

    def close(self) -> None:
        """Stop reading and give the connection back (idempotent)."""
        close = getattr(self._deltas, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> ProviderStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncProviderStream(_StreamState):
    """A streamed reply (async): ``async for delta in stream``; otherwise as
    :class:`ProviderStream` (``await stream.aclose()``, ``async with``)."""

    def __init__(self, provider: str, model: str, deltas: AsyncIterator[str] | None = None
                 ) -> None:
        super().__init__(provider, model)
        self._deltas = deltas

    def _bind(self, deltas: AsyncIterator[str]) -> None:
        self._deltas = deltas

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        assert self._deltas is not None
        delta = await self._deltas.__anext__()
        self.started = True
        self._parts.append(delta)
        return delta

    async def aclose(self) -> None:
        """Stop reading and give the connection back (idempotent)."""
        aclose = getattr(self._deltas, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncProviderStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@runtime_checkable
class Provider(Protocol):
    """A model provider, sync and async, whole and streamed (same names as twins).

    ``messages`` are OpenAI-style chat messages; ``max_tokens`` bounds the completion;
    ``params`` go into the request body as the API names them (``temperature``, ...).
    Every method raises :class:`ProviderError` (or a subclass) and nothing else for a
    failed call."""

    id: str

    def complete(self, model: str, messages: Sequence[Message], *, max_tokens: int,
                 **params: Any) -> Reply: ...

    async def acomplete(self, model: str, messages: Sequence[Message], *, max_tokens: int,
                        **params: Any) -> Reply: ...

    def stream(self, model: str, messages: Sequence[Message], *, max_tokens: int,
               **params: Any) -> ProviderStream: ...

    def astream(self, model: str, messages: Sequence[Message], *, max_tokens: int,
                **params: Any) -> AsyncProviderStream: ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...
