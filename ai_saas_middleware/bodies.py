"""Response bodies that settle their request when they end. Shared by the adapters.

An adapter whose framework hands it the response body as an iterable (WSGI, Django's
``StreamingHttpResponse``, sync or async) wraps it in :class:`MeteredBody` or
:class:`AsyncMeteredBody`: every chunk passes through unchanged, is shown to a
:class:`~ai_saas_middleware.usage.ResponseMeter`, and when the body is exhausted or
closed (the server calls ``close()`` after the last byte, or when the client went away)
the request is settled exactly once. Settlement never raises into the server: an error
in accounting is logged, and the response stands.

:func:`read_limited` reads a request body from a file-like stream (``wsgi.input``) up to
the configured limit; :func:`read_request_body` adds the Content-Length checks and the
refusals (400, 413).

Async bodies (:class:`AsyncMeteredBody`) settle in a task of the running loop
(:func:`settle_in_background`), so the end of a stream never waits on Redis; the same
serves frameworks that send a response after the adapter returned it (Django).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from typing import IO, Any

from . import background
from .context import RequestContext, Ticket
from .gateway import AsyncGateway, Gateway
from .types import Decision, Outcome
from .usage import ResponseMeter

__all__ = ["AsyncMeteredBody", "MeteredBody", "read_limited", "read_request_body",
           "settle_in_background", "settle_quietly", "wait_for_settlements"]

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


def settle_quietly(gateway: Gateway, ticket: Ticket, outcome: Outcome,
                   ctx: RequestContext | None) -> None:
    """``gateway.settle(...)`` for adapters: an error in accounting is logged, never
    raised into the server or the app (the response stands; the event is spooled by the
    gateway when Redis is the trouble)."""
    try:
        gateway.settle(ticket, outcome, ctx)
    except Exception:
        log.exception("settling request %s failed", ticket.request_id)


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
        if meter.length_declared:
            # The server asks for the next chunk only after writing the last one, and a
            # response of declared length has nothing to write after it: the client has
            # every byte, so settle now (this also serves test clients that close late).
            # A chunked response still owes its terminating chunk: close() settles it,
            # after the server wrote that, so the client never waits on Redis.
            self.settle(failed=False)

    def settle(self, failed: bool) -> None:
        """Settle now (once); later calls do nothing."""
        outcome = self._settlement.outcome_once(failed)
        if outcome is not None:
            settle_quietly(self._gateway, self._settlement.ticket, outcome,
                           self._settlement.ctx)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self.settle(failed=False)

    def __del__(self) -> None:
        # A server that drops the body without close(): Werkzeug's does, when draining the
        # socket after the last byte raises (a client that reset the connection). The
        # request is settled when the body is let go, rather than never.
        settlement = getattr(self, "_settlement", None)  # (None: __init__ did not finish)
        if settlement is not None and not settlement.settled:
            self.settle(failed=False)


# --------------------------------------------------------------------------- appended for
# adapters whose framework hands them a request stream and a response object (Django).


def read_request_body(stream: IO[bytes], headers: Mapping[str, str],
                      gateway: Gateway | AsyncGateway) -> bytes | Decision:
    """The request body from a file-like ``stream``, or the refusal to answer instead.

    400 when ``Content-Length`` is not a whole number; 413 when it (or, without one, the
    body read so far) is over ``http.maxBodyBytes``, found before reading a byte when
    the length is declared. ``headers`` has lower-case names.
    """
    declared = gateway.declared_length(headers)
    if isinstance(declared, Decision):
        return declared
    body = read_limited(stream, declared, gateway.max_body_bytes)
    if body is None:
        return gateway.too_large()
    return body


async def _settle_guarded(gateway: AsyncGateway, ticket: Ticket, outcome: Outcome,
                          ctx: RequestContext | None) -> None:
    try:
        await gateway.settle(ticket, outcome, ctx)  # (a cancellation spools it: see settle)
    except Exception:  # accounting must never break the app
        log.exception("settling request %s failed", ticket.request_id)


def settle_in_background(gateway: AsyncGateway, ticket: Ticket, outcome: Outcome,
                         ctx: RequestContext | None) -> asyncio.Task[None]:
    """Start ``gateway.settle(...)`` as a task of the running loop, and return it.

    For adapters that hand the response back to a framework which sends it afterwards
    (Django): the settlement's round trip overlaps the sending, the client never waits
    on it, and it does not depend on the server calling ``close()``. The task is held
    until it is done; failures are logged; :func:`wait_for_settlements` awaits them.
    """
    return background.start(_settle_guarded(gateway, ticket, outcome, ctx))


async def wait_for_settlements() -> None:
    """Wait until every background settlement of the running loop is done.

    Settlements scheduled from another thread (:meth:`AsyncMeteredBody.close`)
    are started first. For tests, and for a shutdown hook that must not lose events.
    """
    await background.wait_for_all()


class AsyncMeteredBody:
    """The asyncio twin of :class:`MeteredBody`, for async iterables (Django under ASGI).

    - When the body ends, fails or is cancelled, the settlement is started with
      :func:`settle_in_background` rather than awaited, so the server sends the end of
      the stream without waiting on Redis.
    - :meth:`close` is for frameworks that close the response from sync code (Django
      calls the ``close()`` of its streaming content, from a worker thread): a body a
      server stopped reading without finishing it is settled then (as a disconnect),
      on the loop the body was made on, instead of whenever the garbage collector gets
      to the abandoned generator.

    Must be created with the event loop running (it remembers the loop).
    """

    def __init__(self, body: AsyncIterable[bytes], gateway: AsyncGateway, ticket: Ticket,
                 ctx: RequestContext, meter: ResponseMeter):
        self._body = body
        self._gateway = gateway
        self._settlement = _Settlement(ticket, ctx, meter)
        self._loop = asyncio.get_running_loop()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        meter = self._settlement.meter
        failed = False
        try:
            async for chunk in self._body:
                meter.feed(chunk)
                yield chunk
            meter.finish()
        except (GeneratorExit, asyncio.CancelledError):
            # The consumer stopped: it closed the body, or cancelled the task reading it
            # (Django >= 5.0 does when the client disconnects). Billed as a disconnect.
            raise
        except BaseException:
            failed = True
            raise
        finally:
            self.settle_soon(failed)

    def settle_soon(self, failed: bool = False) -> None:
        """Start the settlement (once); call on the body's event loop."""
        outcome = self._settlement.outcome_once(failed)
        if outcome is not None:
            settle_in_background(self._gateway, self._settlement.ticket, outcome,
                                 self._settlement.ctx)

    def close(self) -> None:
        """Settle (once) on the body's loop; callable from any thread."""
        try:
            self._loop.call_soon_threadsafe(self.settle_soon, False)
        except RuntimeError:  # the loop is closed: nothing can settle asynchronously now
            log.error("request %s closed after its event loop: not settled",
                      self._settlement.ticket.request_id)
