"""``AISaaSMiddleware`` for Django's ``MIDDLEWARE``, sync and async capable.

Django calls ``__init__`` once per handler with the next ``get_response``. When that is
a coroutine function (an ASGI deployment), the instance marks itself as one
(``markcoroutinefunction``) and serves every request on the event loop with the
:class:`~ai_saas_middleware.AsyncGateway`: admission and settlement await
``redis.asyncio``; no thread is involved for Redis. Otherwise (WSGI) it uses the sync
:class:`~ai_saas_middleware.Gateway`. Both paths share the helpers below; the decisions
are the core's.

When each request is settled:

- WSGI, whole response: by a closer registered on the response
  (``response._resource_closers``), which Django runs when the server closes the
  response, after the last byte was written.
- ASGI, whole response: in a task (:func:`~ai_saas_middleware.bodies.settle_in_background`)
  started on the loop tick after the response left the middleware. Django sends the
  response after the middleware returns it, so reading the usage from the body and the
  settlement's round trip come after the sending, and the client waits on neither
  (the status, content type and body are taken as the response leaves, before an outer
  middleware could change them). This was chosen over a closer because Django runs
  ``response.close()`` in a worker thread (a hop back to the loop would be needed) and
  skips it when the handling task is cancelled, which would lose the event; the task
  never depends on the server. A settlement cut short by the loop shutting down goes to
  the spool.
- Streamed responses (``StreamingHttpResponse``, sync or async iterator): the content
  is replaced by a metered body that settles once, when it is exhausted (with the
  provider's usage from the final SSE chunk), fails, or is closed or cancelled because
  the client went away (billed as produced, ``client_disconnected=true``). Iterators of
  the other kind than the path's are consumed the way Django itself does (whole, in one
  ``sync_to_async`` / ``async_to_sync`` call).
- A handler that raises: Django turns it into a 500 response before it reaches this
  middleware, which settles it as failed (reservation released); with
  ``DEBUG_PROPAGATE_EXCEPTIONS`` the exception passes through, settled the same way.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Any, Literal, cast, overload

from asgiref.sync import (
    async_to_sync,
    iscoroutinefunction,
    markcoroutinefunction,
    sync_to_async,
)
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.urls import Resolver404, resolve
from django.utils.module_loading import import_string

from ..bodies import (
    AsyncMeteredBody,
    MeteredBody,
    read_request_body,
    settle_in_background,
    settle_quietly,
)
from ..config import Config, EndpointConfig, load_config
from ..context import RequestContext, Ticket
from ..environ import environ_headers
from ..errors import ConfigError, RequestRefused
from ..gateway import AsyncGateway, Gateway
from ..types import Decision, RequestInfo
from ..usage import ResponseMeter, meter_for
from .conf import ai_saas

__all__ = ["AISaaSMiddleware", "get_gateway", "render", "request_headers", "resolve_tenant"]

log = logging.getLogger("ai_saas_middleware")

GetResponse = Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]]

# ------------------------------------------------------------------ the process's gateways

_lock = threading.Lock()
_config: Config | None = None
_gateways: dict[bool, Gateway | AsyncGateway] = {}


def _load_or_raise() -> Config:
    """The configuration of ``AI_SAAS``, or ImproperlyConfigured naming every problem of
    the setting and of the configuration together (as ``manage.py check`` does)."""
    problems = [message for _, message in ai_saas.problems()]
    source = ai_saas.CONFIG
    config: Config | None = None
    if isinstance(source, (str, os.PathLike, Mapping, Config)):
        try:
            config = load_config(source)
        except ConfigError as exc:
            problems.append(f"AI_SAAS['CONFIG']: {exc}")
    if problems or config is None:
        raise ImproperlyConfigured("; ".join(problems))
    return config


@overload
def get_gateway(asynchronous: Literal[True]) -> AsyncGateway: ...
@overload
def get_gateway(asynchronous: Literal[False]) -> Gateway: ...
@overload
def get_gateway(asynchronous: bool) -> Gateway | AsyncGateway: ...
def get_gateway(asynchronous: bool) -> Gateway | AsyncGateway:
    """The process's gateway for the ``AI_SAAS`` setting: one sync, one asyncio.

    Both are built from one loaded config, on first use (the middleware's ``__init__``,
    i.e. at start-up); a change of the setting (``override_settings``) starts afresh.

    Raises:
        ImproperlyConfigured: the setting or the configuration is invalid (every
            problem of the configuration, with its path, in the message).
    """
    global _config
    with _lock:
        gateway = _gateways.get(asynchronous)
        if gateway is None:
            if _config is None:
                _config = _load_or_raise()
            kind = AsyncGateway if asynchronous else Gateway
            gateway = _gateways[asynchronous] = kind(_config, redis_url=ai_saas.REDIS_URL)
        return gateway


def _setting_changed(*, setting: str, **kwargs: Any) -> None:
    global _config
    if setting == "AI_SAAS":
        with _lock:  # gateways already handed out stay with their middleware
            _config = None
            _gateways.clear()


setting_changed.connect(_setting_changed, dispatch_uid="ai_saas_middleware.django.gateways")

# ------------------------------------------------------------------ shared helpers


def request_headers(request: HttpRequest) -> dict[str, str]:
    """The request's headers with lower-case names, as the core takes them."""
    return environ_headers(request.META)


def resolve_tenant(resolver: Any, request: HttpRequest) -> str | None:
    """The ``RESOLVER``'s tenant for ``request``, from sync code (an async resolver is
    run to completion, as Django runs async code from a sync view)."""
    tenant: str | None = (async_to_sync(resolver) if iscoroutinefunction(resolver)
                          else resolver)(request)
    return tenant


def render(decision: Decision) -> HttpResponse:
    """A Decision as a whole response: the core's status, headers and bytes, unchanged."""
    response = HttpResponse(decision.body, status=decision.status)
    for name, value in decision.headers:
        response[name] = value
    response["content-length"] = str(len(decision.body))
    return response


def _read_body(request: HttpRequest, headers: dict[str, str],
               gateway: Gateway | AsyncGateway) -> bytes | Decision:
    """The body, read once within ``http.maxBodyBytes``, then left as ``request.body``.

    Read here, not through ``request.body``: that would apply Django's own
    ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (a 400) instead of the configured limit (a 413).
    """
    body: bytes | None = getattr(request, "_body", None)  # read by an outer middleware
    if body is not None:
        return body if len(body) <= gateway.max_body_bytes else gateway.too_large()
    result = read_request_body(request, headers, gateway)
    if isinstance(result, bytes):
        # What HttpRequest.body leaves behind after reading: request.body, .POST and
        # .read() all work in the view.
        request._body = result
        request._stream = io.BytesIO(result)
    return result


def _admitted(request: HttpRequest, decision: Decision, by_header: bool) -> None:
    request.ai = decision.context
    if by_header:
        # Authenticated by a credential in a header (the API key; or a tenant header the
        # deployment trusts), which a browser cannot attach to a cross-site request
        # without a CORS preflight the app must consent to: not exposed to CSRF.
        # CsrfViewMiddleware.process_view honours this flag (its test client sets it);
        # Django REST framework exempts its token authentication alike. A tenant from
        # the RESOLVER (the session) stays checked: see _resolve_checked.
        request._dont_enforce_csrf_checks = True


def _add_headers(response: HttpResponseBase, decision: Decision) -> None:
    for name, value in decision.headers:
        response[name] = value


_Sent = tuple[int, str, bytes | None]  # status, content type, content (None: streamed)


def _sent(response: HttpResponseBase) -> _Sent:
    """What the meter reads of a response, taken as it leaves the middleware.

    Taken then, not later: an outer middleware may still change the response before it
    is sent (``GZipMiddleware`` compresses its content), and the usage is the view's.
    """
    content = None
    if not response.streaming:
        assert isinstance(response, HttpResponse)
        content = response.content
    return response.status_code, response.get("Content-Type", ""), content


def _meter_of(sent: _Sent, ctx: RequestContext) -> ResponseMeter:
    status, content_type, content = sent
    meter: ResponseMeter = meter_for(ctx)
    meter.start(status, content_type)
    if content is not None:
        meter.feed(content)
        meter.finish()
    return meter


def _meter(response: HttpResponseBase, ctx: RequestContext) -> ResponseMeter:
    return _meter_of(_sent(response), ctx)


def _settle_sent(gateway: AsyncGateway, ticket: Ticket, ctx: RequestContext, sent: _Sent,
                 failed: bool) -> None:
    """Settle a whole response on the loop tick after it left the middleware (ASGI).

    Parsing the body for the provider's usage and starting the settlement task cost the
    client about 15 us on the benchmark's Django ASGI path when done before Django sends
    the response; see ``_ai_request_async`` for why this runs after it.
    """
    try:
        outcome = _meter_of(sent, ctx).outcome(failed=failed)
        settle_in_background(gateway, ticket, outcome, ctx)
    except Exception:  # accounting must never break the app (and this is a loop callback)
        log.exception("settling request %s failed", ticket.request_id)


def _sync_chunks(body: AsyncIterable[bytes]) -> Iterator[bytes]:
    """An async body on the sync path, consumed as Django does: whole, in one call."""
    async def to_list() -> list[bytes]:
        return [chunk async for chunk in body]

    yield from async_to_sync(to_list)()


async def _async_chunks(body: Iterable[bytes]) -> AsyncIterator[bytes]:
    """A sync body on the async path, consumed as Django does: whole, in a thread."""
    def consume() -> list[bytes]:
        return list(body)

    for chunk in await sync_to_async(consume)():
        yield chunk


def _csrf_middleware() -> CsrfViewMiddleware | None:
    """The project's ``CsrfViewMiddleware`` (or subclass) from ``MIDDLEWARE``, or None.

    An instance of its own class, so that a project's subclass (a custom origin check)
    decides here as it would at the view; only its ``process_view`` is used.
    """
    for name in getattr(settings, "MIDDLEWARE", None) or ():
        try:
            cls = import_string(name)
        except ImportError:  # Django itself reports it when it loads MIDDLEWARE
            continue
        if isinstance(cls, type) and issubclass(cls, CsrfViewMiddleware):
            return cls(lambda request: None)
    return None


# ------------------------------------------------------------------ the middleware


class AISaaSMiddleware:
    """Django middleware that makes every AI request cost-aware.

    Add it to ``MIDDLEWARE`` after ``AuthenticationMiddleware`` (when a resolver reads
    ``request.user``). Configured by the ``AI_SAAS`` setting; see
    :mod:`ai_saas_middleware.django`.

    Raises:
        ImproperlyConfigured: at start-up, for a bad ``AI_SAAS`` setting or configuration.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse):
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)
        self.gateway = get_gateway(self.async_mode)
        self.resolver: Any = ai_saas.RESOLVER  # request -> tenant id | None, sync or async
        self.resolver_is_async = self.resolver is not None and iscoroutinefunction(
            self.resolver)
        self.csrf = _csrf_middleware() if self.resolver is not None else None

    def __repr__(self) -> str:
        return f"<AISaaSMiddleware {'async' if self.async_mode else 'sync'}>"

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        endpoint = self.gateway.endpoint_for(request.method or "GET", request.path_info)
        if endpoint is None:
            return self.get_response(request)
        return self._ai_request(request, endpoint)

    # ------------------------------------------------------------ sync (WSGI)

    def process_exception(self, request: HttpRequest, exception: Exception
                          ) -> HttpResponse | None:
        """A view that let ``ctx.execute`` / ``ctx.complete``'s NoHealthyModel out: its 503
        (or ``routing.defaultResponse``) is the answer, not Django's 500."""
        if isinstance(exception, RequestRefused) and getattr(request, "ai", None) is not None:
            request.ai.failed = True
            return render(cast(Decision, exception.decision))
        return None

    def _ai_request(self, request: HttpRequest, endpoint: EndpointConfig) -> HttpResponseBase:
        gateway = self.gateway
        assert isinstance(gateway, Gateway)
        headers = request_headers(request)
        body = _read_body(request, headers, gateway)
        if isinstance(body, Decision):
            return render(body)
        tenant = None
        if self.resolver is not None:
            tenant, forbidden = self._resolve_checked(request)
            if forbidden is not None:
                return forbidden
        decision = gateway.admit(RequestInfo(request.method or "GET", request.path_info,
                                             headers, body, tenant), endpoint)
        if not decision.allowed:
            return render(decision)
        ctx, ticket = decision.context, decision.ticket
        assert ctx is not None and ticket is not None
        _admitted(request, decision, tenant is None)
        try:
            response = self.get_response(request)
        except BaseException:
            settle_quietly(gateway, ticket, ResponseMeter().outcome(failed=True), ctx)
            raise
        assert isinstance(response, HttpResponseBase)
        _add_headers(response, decision)
        meter = _meter(response, ctx)
        if isinstance(response, StreamingHttpResponse):
            content: Iterable[bytes] = (_sync_chunks(response.streaming_content)
                                        if response.is_async else response.streaming_content)
            response.streaming_content = MeteredBody(content, gateway, ticket, ctx, meter)
        else:
            # Run by response.close(), which the WSGI server calls after the last byte
            # (once; ctx.failed is read then, after the view's last word).
            response._resource_closers.append(
                lambda: settle_quietly(gateway, ticket, meter.outcome(failed=ctx.failed), ctx))
        return response

    # ------------------------------------------------------------ async (ASGI)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        endpoint = self.gateway.endpoint_for(request.method or "GET", request.path_info)
        if endpoint is None:
            response: HttpResponseBase = await self.get_response(request)
            return response
        return await self._ai_request_async(request, endpoint)

    async def _resolve_async(self, request: HttpRequest
                             ) -> tuple[str | None, HttpResponseBase | None]:
        """The resolver's tenant, and CSRF's refusal of a session request (see
        ``_resolve_checked``)."""
        assert self.resolver is not None
        if not self.resolver_is_async:
            # The app's own code, which may touch the ORM (request.user): not on the loop;
            # CSRF's check goes along in the same thread.
            return await sync_to_async(self._resolve_checked)(request)
        tenant: str | None = await self.resolver(request)
        if tenant is None or self.csrf is None:
            return tenant, None
        # CSRF_USE_SESSIONS reads the session, and a CSRF_FAILURE_VIEW is the app's code.
        return tenant, await sync_to_async(self._csrf_refusal)(request)

    def _resolve_checked(self, request: HttpRequest
                         ) -> tuple[str | None, HttpResponseBase | None]:
        """The resolver's tenant, and CSRF's refusal when the resolver found one.

        A tenant from the resolver comes from the session cookie, which a browser sends
        cross-site on its own: such a request is checked for CSRF here, before admission,
        so that a forged one takes no rate-limit slot and leaves no usage event. (Django
        checks CSRF only after every middleware's ``__call__``, in ``process_view``.)
        """
        assert self.resolver is not None
        tenant = resolve_tenant(self.resolver, request)
        if tenant is None or self.csrf is None:
            return tenant, None
        return tenant, self._csrf_refusal(request)

    def _csrf_refusal(self, request: HttpRequest) -> HttpResponseBase | None:
        """``CsrfViewMiddleware``'s verdict for the view the request goes to: its 403
        (the project's ``CSRF_FAILURE_VIEW``), or None.

        It is the check Django would make at the view: a ``@csrf_exempt`` view is
        exempt, safe methods pass; once passed it is not made again there
        (``request.csrf_processing_done``).
        """
        assert self.csrf is not None
        try:
            match = resolve(request.path_info, getattr(request, "urlconf", None))
        except Resolver404:
            return None  # no view: Django answers 404 and never consults CSRF
        refusal: HttpResponseBase | None = self.csrf.process_view(
            request, match.func, match.args, match.kwargs)
        return refusal

    async def _ai_request_async(self, request: HttpRequest, endpoint: EndpointConfig
                                ) -> HttpResponseBase:
        gateway = self.gateway
        assert isinstance(gateway, AsyncGateway)
        headers = request_headers(request)
        # Django's ASGI handler has spooled the body already: this reads memory (or, past
        # FILE_UPLOAD_MAX_MEMORY_SIZE, a temporary file), not the socket.
        body = _read_body(request, headers, gateway)
        if isinstance(body, Decision):
            return render(body)
        tenant = None
        if self.resolver is not None:
            tenant, forbidden = await self._resolve_async(request)
            if forbidden is not None:
                return forbidden
        decision = await gateway.admit(RequestInfo(request.method or "GET", request.path_info,
                                                   headers, body, tenant), endpoint)
        if not decision.allowed:
            return render(decision)
        ctx, ticket = decision.context, decision.ticket
        assert ctx is not None and ticket is not None
        _admitted(request, decision, tenant is None)
        try:
            response: HttpResponseBase = await self.get_response(request)
        except BaseException as exc:
            # Cancelled: Django >= 5.0 cancels the view when the client disconnects.
            cancelled = isinstance(exc, asyncio.CancelledError)
            settle_in_background(gateway, ticket, ResponseMeter().outcome(
                failed=not cancelled, disconnected=cancelled), ctx)
            raise
        _add_headers(response, decision)
        if isinstance(response, StreamingHttpResponse):
            meter = _meter(response, ctx)
            content: AsyncIterable[bytes] = (response.streaming_content if response.is_async
                                             else _async_chunks(response.streaming_content))
            response.streaming_content = AsyncMeteredBody(content, gateway, ticket,
                                                                    ctx, meter)
        else:
            # Django sends the response in this same task once the middleware returned it,
            # and an ASGI server's send only hands the bytes to its transport: a callback
            # scheduled now runs after the last byte was handed over, so metering the body
            # and starting the settlement task stay off the client's time, as on the other
            # adapters. Should anything wait first (back-pressure; Django logs a 4xx/5xx in
            # a thread before sending), the settlement merely starts during the sending.
            # What it needs is taken now (``_sent``); wait_for_settlements() lets pending
            # callbacks run before it looks for settlements.
            asyncio.get_running_loop().call_soon(_settle_sent, gateway, ticket, ctx,
                                                 _sent(response), ctx.failed)
        return response
