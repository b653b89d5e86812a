"""Response bodies that settle their request when they end. Shared by the adapters.

An adapter whose framework hands it the response body as an iterable (WSGI, Django's
``StreamingHttpResponse``, sync or async) wraps it in :class:`MeteredBody` or
:class:`AsyncMeteredBody`: every chunk passes through unchanged, is shown to a
:class:`~ai_saas_middleware.usage.ResponseMeter`, and when the body is exhausted or
closed (the server calls ``close()`` after the last byte, or when the client went away)
the request is settled exactly once. Settlement never raises into the server: an error
in accounting is logged, and the response stands.

:func:`read_limited` reads a request body from a file-like stream (``wsgi.input``) up to
the configured limit.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import IO, Any

from .context import RequestContext, Ticket
from .gateway import AsyncGateway, Gateway
from .usage import ResponseMeter

__all__ = ["AsyncMeteredBody", "MeteredBody", "read_limited"]

log = logging.getLogger("ai_saas_middleware")


def read_limited(stream: IO[bytes], declared: int | None, limit: int) -> bytes | None:
    """The body from ``stream``; None when it is longer than ``limit`` bytes.

    ``declared`` is the Content-Length (None when the body is chunked: then the stream
    is read until it ends, a chunk at a time, and no more than ``limit + 1`` bytes).
    """
    if declared is not None:
        if declared > limit:
            return None
        return stream.read(declared) if declared else b""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = stream.read(min(65536, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


class _Settlement:
    """Settles one request once; shared by the sync and async bodies."""

    __slots__ = ("ctx", "meter", "settled", "ticket")

    def __init__(self, ticket: Ticket, ctx: RequestContext, meter: ResponseMeter):
        self.ticket = ticket
        self.ctx = ctx
        self.meter = meter
        self.settled = False

    def outcome_once(self, failed: bool) -> Any:
        if self.settled:
            return None
        self.settled = True
        return self.meter.outcome(failed=failed or self.ctx.failed)


class MeteredBody:
    """A WSGI-style body iterable that meters each chunk and settles when it ends.

    Args:
        body: the app's body iterable (its ``close()`` is called, as WSGI requires).
        gateway: the sync gateway to settle with.
        ticket, ctx: from the admission Decision.
        meter: already ``start()``-ed with the response's status and content type.
    """

    def __init__(self, body: Iterable[bytes], gateway: Gateway, ticket: Ticket,
                 ctx: RequestContext, meter: ResponseMeter):
        self._body = body
        self._gateway = gateway
        self._settlement = _Settlement(ticket, ctx, meter)

    def __iter__(self) -> Iterator[bytes]:
        meter = self._settlement.meter
        try:
            for chunk in self._body:
                meter.feed(chunk)
                yield chunk
        except GeneratorExit:
            raise  # the server stopped iterating (client gone): close() settles
        except BaseException:
            self.settle(failed=True)
            raise
        meter.finish()
        # The server asks for the next chunk only after writing the last one, so the
        # client has every byte now; settling here also serves servers and test clients
        # that close late. close() settles whatever ends otherwise.
        self.settle(failed=False)

    def settle(self, failed: bool) -> None:
        """Settle now (once); later calls do nothing."""
        outcome = self._settlement.outcome_once(failed)
        if outcome is None:
            return
        try:
            self._gateway.settle(self._settlement.ticket, outcome, self._settlement.ctx)
        except Exception:  # accounting must never break the response
            log.exception("settling request %s failed", self._settlement.ticket.request_id)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self.settle(failed=False)


class AsyncMeteredBody:
    """The asyncio twin of :class:`MeteredBody`, for async iterables (Django ASGI)."""

    def __init__(self, body: AsyncIterable[bytes], gateway: AsyncGateway, ticket: Ticket,
                 ctx: RequestContext, meter: ResponseMeter):
        self._body = body
        self._gateway = gateway
        self._settlement = _Settlement(ticket, ctx, meter)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        meter = self._settlement.meter
        failed = False
        try:
            async for chunk in self._body:
                meter.feed(chunk)
                yield chunk
            meter.finish()
        except GeneratorExit:
            raise
        except BaseException:
            failed = True
            raise
        finally:
            # An async generator has no close() the server calls for sure: settle here,
            # whether it ended, failed, or was closed because the client went away.
            await self.aclose(failed)

    async def aclose(self, failed: bool = False) -> None:
        outcome = self._settlement.outcome_once(failed)
        if outcome is None:
            return
        try:
            await self._gateway.settle(self._settlement.ticket, outcome, self._settlement.ctx)
        except Exception:  # accounting must never break the response
            log.exception("settling request %s failed", self._settlement.ticket.request_id)
