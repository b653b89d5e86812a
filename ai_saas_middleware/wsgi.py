"""WSGI middleware: any WSGI app (Flask, Bottle, Pyramid, Falcon, ...).

::

    from ai_saas_middleware.wsgi import AISaaSMiddleware
    app.wsgi_app = AISaaSMiddleware(app.wsgi_app, config="ai-saas-config.yaml")

Requests that match no configured endpoint go straight to the app: no Redis call, no
body read. For an AI request the body is read once (at most ``http.maxBodyBytes``, else
413), admitted by the core in one round trip, and put back as ``wsgi.input`` for the
app; the context is at ``environ["ai_saas"]``. The response passes through unchanged
but for the ``X-Request-ID``, ``X-AI-Model`` and RateLimit headers. The request is
settled in one more round trip when the server closes the response body, that is after
the last byte was sent, or when the client went away (what was produced is billed).

``resolver``, when given, maps the environ to a tenant id (for apps whose users are
already authenticated); when it returns None, the API key decides.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

from .bodies import MeteredBody, read_limited
from .config import Config
from .gateway import Gateway
from .responses import refusal
from .types import Decision, RequestInfo
from .usage import ResponseMeter

__all__ = ["AISaaSMiddleware", "environ_headers"]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
Resolver = Callable[[Environ], Union[str, None]]
ConfigSource = Union[Config, Mapping[str, Any], str, "os.PathLike[str]"]

_STATUS_LINES = {200: "200 OK", 400: "400 Bad Request", 401: "401 Unauthorized",
                 405: "405 Method Not Allowed", 413: "413 Payload Too Large",
                 415: "415 Unsupported Media Type", 422: "422 Unprocessable Entity",
                 429: "429 Too Many Requests", 503: "503 Service Unavailable"}


def environ_headers(environ: Mapping[str, Any]) -> dict[str, str]:
    """The request headers of a WSGI environ, with lower-case names."""
    headers = {key[5:].replace("_", "-").lower(): value
               for key, value in environ.items() if key.startswith("HTTP_")}
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = environ["CONTENT_TYPE"]
    if environ.get("CONTENT_LENGTH"):
        headers["content-length"] = environ["CONTENT_LENGTH"]
    return headers


def decision_response(decision: Decision, start_response: StartResponse) -> list[bytes]:
    """Write a Decision as a whole WSGI response."""
    headers = [*decision.headers, ("content-length", str(len(decision.body)))]
    start_response(_STATUS_LINES.get(decision.status, str(decision.status)), headers)
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
        endpoint = self.gateway.endpoint_for(environ.get("REQUEST_METHOD", "GET"),
                                             environ.get("PATH_INFO", ""))
        if endpoint is None:
            return self.app(environ, start_response)
        headers = environ_headers(environ)
        declared = headers.get("content-length")
        if declared is not None and not declared.isdigit():
            return decision_response(refusal("invalid_request",
                                             "Content-Length must be a whole number"),
                                     start_response)
        body = read_limited(environ["wsgi.input"], int(declared) if declared else None,
                            self.max_body_bytes)
        if body is None:
            return decision_response(self.gateway.too_large(), start_response)
        tenant = self.resolver(environ) if self.resolver is not None else None
        info = RequestInfo(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), headers,
                           body, tenant)
        decision = self.gateway.admit(info, endpoint)
        if not decision.allowed:
            return decision_response(decision, start_response)
        ctx, ticket = decision.context, decision.ticket
        assert ctx is not None and ticket is not None
        environ["ai_saas"] = ctx
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        meter = ResponseMeter()
        extra = list(decision.headers)

        def metered_start_response(status: str, response_headers: list[tuple[str, str]],
                                   exc_info: Any = None) -> Any:
            content_type = next((v for k, v in response_headers
                                 if k.lower() == "content-type"), "")
            meter.start(int(status.split(" ", 1)[0]), content_type)
            return start_response(status, [*response_headers, *extra], exc_info)

        try:
            app_body = self.app(environ, metered_start_response)
        except BaseException:
            MeteredBody((), self.gateway, ticket, ctx, meter).settle(failed=True)
            raise
        return MeteredBody(app_body, self.gateway, ticket, ctx, meter)
