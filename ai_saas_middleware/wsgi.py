"""WSGI middleware: any WSGI app (Flask, Bottle, Pyramid, Falcon, ...).

::

    from ai_saas_middleware.wsgi import AISaaSMiddleware
    app.wsgi_app = AISaaSMiddleware(app.wsgi_app, config="ai-saas-config.yaml")

Requests that match no configured endpoint go straight to the app: no Redis call, no
body read. For an AI request the body is read once (at most ``http.maxBodyBytes``, else
413), admitted by the core in one round trip, and put back as ``wsgi.input`` for the
app; the context is at ``environ["ai_saas.context"]``. A body without Content-Length is read
only when the server says its stream ends (``wsgi.input_terminated``, as Werkzeug and
gunicorn do for chunked requests); otherwise it counts as empty, as in Werkzeug, rather
than waiting on a socket. The response passes through unchanged but for the
``X-Request-ID``, ``X-AI-Model`` and RateLimit headers, whether the app returns its
body or writes it through the ``write()`` of ``start_response``. The request is settled
in one more round trip when the body is exhausted (the server asks for the next chunk
only after writing the last one) or closed (the server calls ``close()`` at the end, or
when the client went away: what was produced is billed), once.

``resolver``, when given, maps the environ to a tenant id (for apps whose users are
already authenticated); when it returns None, the API key decides. It is called after
the body was read, with ``wsgi.input`` already replaced by the buffered body, so a
framework request built from the environ can read it.

:class:`UsageApp` is a WSGI app for the tenant's own usage endpoint (``GET``), to mount
wherever the app's clients can reach it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any, Union, cast

from .bodies import MeteredBody, read_request_body, settle_quietly
from .config import Config
from .environ import environ_headers, request_path
from .errors import RequestRefused
from .gateway import Gateway
from .types import Decision, RequestInfo
from .usage import meter_for

__all__ = ["ENVIRON_KEY", "AISaaSMiddleware", "UsageApp", "decision_response",
           "environ_headers", "request_path"]

ENVIRON_KEY = "ai_saas.context"  # the RequestContext of an admitted request (PEP 3333:
# keys of extensions carry a dot)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
Resolver = Callable[[Environ], str | None]
ConfigSource = Union[Config, Mapping[str, Any], str, "os.PathLike[str]"]

_STATUS_LINES = {200: "200 OK", 400: "400 Bad Request", 401: "401 Unauthorized",
                 405: "405 Method Not Allowed", 413: "413 Payload Too Large",
                 415: "415 Unsupported Media Type", 422: "422 Unprocessable Entity",
                 429: "429 Too Many Requests", 503: "503 Service Unavailable"}


def _status_line(status: int) -> str:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            line = f"{status} {HTTPStatus(status).phrase}"
        except ValueError:
            line = f"{status} Unknown"
    return line


def decision_response(decision: Decision, start_response: StartResponse) -> list[bytes]:
    """Write a Decision as a whole WSGI response."""
    headers = [*decision.headers, ("content-length", str(len(decision.body)))]
    start_response(_status_line(decision.status), headers)
    return [decision.body]


class AISaaSMiddleware:
    """WSGI middleware that makes every AI request cost-aware.

    Args:
        app: the WSGI app to wrap.
        config: a YAML path, a dict or a loaded Config (ignored when ``gateway`` is given).
        gateway: a sync :class:`Gateway` to share.
        resolver: ``environ -> tenant id | None``.
        redis_url: overrides ``redis.url``.
    """

    def __init__(self, app: WSGIApp, config: ConfigSource | None = None, *,
                 gateway: Gateway | None = None, resolver: Resolver | None = None,
                 redis_url: str | None = None):
        if gateway is None:
            if config is None:
                raise TypeError("AISaaSMiddleware needs config= (a YAML path, a dict or a "
                                "Config) or gateway=")
            gateway = Gateway(config, redis_url=redis_url)
        self.app = app
        self.gateway = gateway
        self.resolver = resolver
        self.max_body_bytes = gateway.max_body_bytes

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = request_path(environ)
        endpoint = self.gateway.endpoint_for(method, path)
        if endpoint is None:
            return self.app(environ, start_response)
        headers = environ_headers(environ)
        body = b""  # without a length, on a stream that may never end: none (as Werkzeug)
        if "content-length" in headers or environ.get("wsgi.input_terminated"):
            read = read_request_body(environ["wsgi.input"], headers, self.gateway)
            if isinstance(read, Decision):  # 400 or 413
                return decision_response(read, start_response)
            body = read
        self._replay(environ, body)
        tenant = None
        if self.resolver is not None:
            tenant = self.resolver(environ)
            self._replay(environ, body)  # afresh: the resolver may have read it
        info = RequestInfo(method, path, headers, body, tenant)
        decision = self.gateway.admit(info, endpoint)
        if not decision.allowed:
            return decision_response(decision, start_response)
        ctx, ticket = decision.context, decision.ticket
        assert ctx is not None and ticket is not None
        environ[ENVIRON_KEY] = ctx
        meter = meter_for(ctx)
        extra = list(decision.headers)

        def metered_start_response(status: str, response_headers: list[tuple[str, str]],
                                   exc_info: Any = None) -> Callable[[bytes], Any]:
            content_type = length = None
            for name, value in response_headers:
                lower = name.lower()
                if lower == "content-type":
                    content_type = value
                elif lower == "content-length":
                    length = value
            meter.start(int(status.split(" ", 1)[0]), content_type or "", length)
            write = start_response(status, [*response_headers, *extra], exc_info)

            def metered_write(data: bytes) -> Any:  # PEP 3333's imperative write()
                meter.feed(data)
                return write(data)

            return metered_write

        try:
            app_body = self.app(environ, metered_start_response)
        except RequestRefused as exc:
            # ctx.execute / ctx.complete ran out of models (NoHealthyModel): its 503, or
            # routing.defaultResponse, is the answer, not a 500.
            if meter.status:
                settle_quietly(self.gateway, ticket, meter.outcome(failed=True), ctx)
                raise
            ctx.failed = True
            app_body = decision_response(cast(Decision, exc.decision), metered_start_response)
        except BaseException:
            settle_quietly(self.gateway, ticket, meter.outcome(failed=True), ctx)
            raise
        return MeteredBody(app_body, self.gateway, ticket, ctx, meter)

    @staticmethod
    def _replay(environ: Environ, body: bytes) -> None:
        environ["wsgi.input"] = io.BytesIO(body)
        environ["wsgi.input_terminated"] = True
        environ["CONTENT_LENGTH"] = str(len(body))


class UsageApp:
    """WSGI app answering ``GET`` with the caller's own usage this month (JSON).

    The twin of :class:`ai_saas_middleware.asgi.UsageApp`. Credentials as for AI
    requests (API key, or ``resolver``); mount it where the tenant's clients can reach
    it, e.g. ``/ai-saas/usage`` (with Werkzeug's ``DispatcherMiddleware``, or return it
    from a view: Flask runs a WSGI app a view returns).
    """

    def __init__(self, gateway: Gateway, resolver: Resolver | None = None):
        self.gateway = gateway
        self.resolver = resolver

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        tenant = self.resolver(environ) if self.resolver is not None else None
        info = RequestInfo(method, request_path(environ), environ_headers(environ), b"", tenant)
        return decision_response(self.gateway.usage(info), start_response)
