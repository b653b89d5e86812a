"""What an HTTP provider does whatever its API: :class:`HTTPProvider` and :class:`Dialect`.

A :class:`Dialect` is one API's wire format without I/O (the request's path, headers and
JSON body; a reply's JSON read into a :class:`~.base.Reply`; a stream's events read one
by one). :class:`HTTPProvider` sends it over :mod:`.transport` and turns statuses, bad
JSON and broken streams into the :class:`~.base.ProviderError` tree, the same way for
every API, sync and async twins side by side.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, ClassVar

from ..config import ProviderConfig
from .base import (
    AsyncProviderStream,
    MalformedReply,
    Message,
    ProviderError,
    ProviderHTTPError,
    ProviderStream,
    Reply,
    StreamCut,
    _StreamState,
)
from .sse import SSEParser
from .transport import AsyncTransport, SyncTransport

__all__ = ["Dialect", "HTTPProvider", "StreamDecoder"]

_MESSAGE_LIMIT = 300  # characters of a provider's error message kept in ours
# One encoder for every body: json.dumps with arguments builds a JSONEncoder per call.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class StreamDecoder:
    """Reads one stream's events (a fresh one per stream).

    :meth:`event` returns the text delta the event carries (or ``None``), records usage,
    the model and the finish reason on ``state``, sets ``state.done`` at the API's end
    marker, and raises :class:`~.base.ProviderError` for an error event or a malformed
    one."""

    def event(self, name: str, data: str, state: _StreamState) -> str | None:
        raise NotImplementedError


class Dialect:
    """One API's wire format (see the module docstring)."""

    path: ClassVar[str]

    def headers(self, api_key: str | None) -> dict[str, str]:
        raise NotImplementedError

    def body(self, model: str, messages: Sequence[Message], max_tokens: int,
             params: Mapping[str, Any], stream: bool) -> dict[str, Any]:
        raise NotImplementedError

    def reply(self, data: Any, model: str) -> Reply:
        """The reply's JSON as a Reply; KeyError, TypeError or ValueError when it is not
        the API's shape (the caller makes that a MalformedReply)."""
        raise NotImplementedError

    def decoder(self) -> StreamDecoder:
        raise NotImplementedError

    @staticmethod
    def error_message(data: Any) -> str | None:
        """The message of an error body (both APIs: ``{"error": {"message": ...}}``)."""
        error = data.get("error") if isinstance(data, Mapping) else None
        message = error.get("message") if isinstance(error, Mapping) else None
        return message if isinstance(message, str) else None


class HTTPProvider:
    """A provider over HTTP: :class:`~.base.Provider`'s methods for one :class:`Dialect`.

    Args:
        config: the ``providers:`` entry.
        dialect: the API's wire format.
        api_key: the key, or ``None`` to read the environment variable
            ``config.api_key_env`` now (a provider with no ``apiKeyEnv`` sends none).

    Raises:
        ProviderError: (not a failure) when ``apiKeyEnv`` names a variable that is not
            set. The key is kept in this object only, and taken out of every error
            message a provider sends back.
    """

    kind: ClassVar[str] = ""

    def __init__(self, config: ProviderConfig, dialect: Dialect, api_key: str | None = None
                 ) -> None:
        if api_key is None and config.api_key_env is not None:
            api_key = os.environ.get(config.api_key_env) or None
            if api_key is None:
                raise ProviderError(
                    f"provider {config.id!r}: the environment variable "
                    f"{config.api_key_env} (its apiKeyEnv) is not set", provider=config.id,
                    failure=False)
        self.id = config.id
        self.config = config
        self._dialect = dialect
        self._key = api_key
        self._path = dialect.path
        timeouts = {"provider": config.id, "headers": dialect.headers(api_key),
                    "connect_timeout_s": config.connect_timeout_s,
                    "read_timeout_s": config.read_timeout_s,
                    "max_connections": config.max_connections}
        self._sync: SyncTransport | None = None
        self._async: AsyncTransport | None = None
        self._transport_args = (config.base_url, timeouts)

    def __repr__(self) -> str:  # never the key
        return f"<{type(self).__name__} {self.id!r} {self.config.base_url}>"

    # -- the transports, made on first use (a sync-only app never imports aiohttp)

    def _sync_transport(self) -> SyncTransport:
        if self._sync is None:
            base_url, kwargs = self._transport_args
            self._sync = SyncTransport(base_url, **kwargs)  # type: ignore[arg-type]
        return self._sync

    def _async_transport(self) -> AsyncTransport:
        if self._async is None:
            base_url, kwargs = self._transport_args
            self._async = AsyncTransport(base_url, **kwargs)  # type: ignore[arg-type]
        return self._async

    def _encode(self, model: str, messages: Sequence[Message], max_tokens: int,
                params: Mapping[str, Any], stream: bool) -> bytes:
        return _ENCODE(self._dialect.body(model, messages, max_tokens, params, stream)
                       ).encode()

    # -- whole replies

    def complete(self, model: str, messages: Sequence[Message], *, max_tokens: int,
                 **params: Any) -> Reply:
        """Call ``model`` and wait for its whole reply.

        Raises:
            ProviderError: a subclass saying what failed (see :mod:`.base`).
        """
        body = self._encode(model, messages, max_tokens, params, False)
        status, headers, data = self._sync_transport().post(self._path, body, model)
        return self._read_reply(status, headers, data, model)

    async def acomplete(self, model: str, messages: Sequence[Message], *, max_tokens: int,
                        **params: Any) -> Reply:
        """The async twin of :meth:`complete`."""
        body = self._encode(model, messages, max_tokens, params, False)
        status, headers, data = await self._async_transport().post(self._path, body,
                                                                   model)
        return self._read_reply(status, headers, data, model)

    def _read_reply(self, status: int, headers: Mapping[str, str], data: bytes, model: str
                    ) -> Reply:
        if not 200 <= status < 300:
            raise self._http_error(status, headers, data, model)
        try:
            return self._dialect.reply(json.loads(data), model)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            raise MalformedReply(f"{self.id}: calling {model}: the reply is not the "
                                 f"{self.kind} API's JSON ({len(data)} bytes)", status=status,
                                 provider=self.id, model=model) from None

    def _http_error(self, status: int, headers: Mapping[str, str], data: bytes, model: str
                    ) -> ProviderHTTPError:
        try:
            detail = self._dialect.error_message(json.loads(data))
        except ValueError:
            detail = None
        text = f"{self.id}: calling {model}: HTTP {status}"
        if detail:
            text += ": " + self._redact(detail)[:_MESSAGE_LIMIT]
        return ProviderHTTPError(text, status=status, provider=self.id, model=model,
                                 retry_after_s=_retry_after(headers.get("retry-after")))

    def _redact(self, text: str) -> str:
        # A provider may quote the key it refused; ours never leaves this object.
        return text.replace(self._key, "[redacted]") if self._key else text

    # -- streams

    def stream(self, model: str, messages: Sequence[Message], *, max_tokens: int,
               **params: Any) -> ProviderStream:
        """A lazy stream of ``model``'s reply: the request goes out on first iteration
        (see :class:`~.base.ProviderStream`)."""
        body = self._encode(model, messages, max_tokens, params, True)
        stream = ProviderStream(self.id, model)
        stream._bind(self._deltas(stream, body, model))
        return stream

    def astream(self, model: str, messages: Sequence[Message], *, max_tokens: int,
                **params: Any) -> AsyncProviderStream:
        """The async twin of :meth:`stream`: ``async for delta in provider.astream(...)``."""
        body = self._encode(model, messages, max_tokens, params, True)
        stream = AsyncProviderStream(self.id, model)
        stream._bind(self._adeltas(stream, body, model))
        return stream

    def _deltas(self, state: ProviderStream, body: bytes, model: str) -> Iterator[str]:
        transport = self._sync_transport()
        resp = transport.open(self._path, body, model)
        finished = False
        try:
            if not 200 <= resp.status < 300:
                data = transport.read_rest(resp, model)
                finished = True
                raise self._http_error(resp.status, resp.headers, data, model)
            parser = SSEParser()
            decoder = self._dialect.decoder()
            try:
                for chunk in transport.chunks(resp, model):
                    state.bytes_received += len(chunk)
                    for name, data_text in parser.feed(chunk):
                        if state.done:
                            continue  # nothing counts after the end marker
                        delta = decoder.event(name, data_text, state)
                        if delta:
                            yield delta
                finished = True
            except ProviderError as exc:
                error = self._mid_stream(state, exc)
                if error is exc:
                    raise
                raise error from exc
            if not state.done:
                raise state._cut("the stream ended without the API's end marker")
        finally:
            transport.release(resp, finished)

    async def _adeltas(self, state: AsyncProviderStream, body: bytes, model: str
                       ) -> AsyncIterator[str]:
        transport = self._async_transport()
        resp = await transport.open(self._path, body, model)
        finished = False
        try:
            if not 200 <= resp.status < 300:
                data = await transport.read_rest(resp, model)
                finished = True
                raise self._http_error(resp.status, resp.headers, data, model)
            parser = SSEParser()
            decoder = self._dialect.decoder()
            try:
                async for chunk in transport.chunks(resp, model):
                    state.bytes_received += len(chunk)
                    for name, data_text in parser.feed(chunk):
                        if state.done:
                            continue
                        delta = decoder.event(name, data_text, state)
                        if delta:
                            yield delta
                finished = True
            except ProviderError as exc:
                error = self._mid_stream(state, exc)
                if error is exc:
                    raise
                raise error from exc
            if not state.done:
                raise state._cut("the stream ended without the API's end marker")
        finally:
            transport.release(resp, finished)

    @staticmethod
    def _mid_stream(state: _StreamState, exc: ProviderError) -> ProviderError:
        """A failure after the reply's head: once text went out it is a cut; before, the
        error as it is (an error event is then the provider's refusal)."""
        if isinstance(exc, StreamCut):
            return exc
        if state.started:
            return state._cut(exc.message.split(": ", 2)[-1])
        return exc

    # -- closing

    def close(self) -> None:
        """Close the sync pool's connections (the async pool: :meth:`aclose`)."""
        if self._sync is not None:
            self._sync.close()

    async def aclose(self) -> None:
        """Close the async pool's connections on the running loop, and the sync ones."""
        if self._async is not None:
            await self._async.aclose()
        self.close()


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare from APIs; the caller uses its own pause
    return seconds if seconds >= 0 else None
