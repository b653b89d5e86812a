"""Flask extension.

::

    from flask import Flask, Response, g, stream_with_context
    from ai_saas_middleware.flask import AI_SAAS_CONFIG, AISaaS, usage_blueprint

    app = Flask(__name__)
    app.config[AI_SAAS_CONFIG] = "ai-saas-config.yaml"   # a YAML path, a dict or a Config
    AISaaS(app)                       # or, in a factory: ai_saas = AISaaS(); ai_saas.init_app(app)
    app.register_blueprint(usage_blueprint, url_prefix="/ai-saas")   # GET /ai-saas/usage

    @app.post("/ai/chat")
    def chat():
        ctx = g.ai                    # also request.environ["ai_saas.context"]
        reply = ctx.execute(lambda model: call_provider(model.id, ctx.body,
                                                        max_tokens=ctx.max_output_tokens))
        return reply                  # its OpenAI-style "usage" is billed

    @app.post("/ai/chat/stream")
    def chat_stream():
        ctx = g.ai
        upstream = open_provider_stream(ctx.model.id, ctx.body)

        @stream_with_context          # g.ai (and request) stay usable while it streams
        def relay():
            yield from upstream       # server-sent events; the final usage chunk is billed
        return Response(relay(), mimetype="text/event-stream")

Every request to a path under ``endpoints`` is tied to a tenant (``Authorization:
Bearer <key>`` or ``X-API-Key``), held to its tier, given the cheapest model that meets
its needs, and recorded with its exact cost in the usage stream; a refusal is a JSON
error in the OpenAI shape (401, 413, 429 with ``Retry-After`` ...), with the same
status, headers and bytes as on the other frameworks. Every other request passes
through untouched, with no Redis call, and finds ``g.ai`` set to None.

Configuration (``app.config`` keys, each a constant of this module; arguments of
:class:`AISaaS` take precedence):

``AI_SAAS_CONFIG``
    The configuration: a path to a YAML file, a dict of the same structure, or a
    loaded :class:`~ai_saas_middleware.config.Config`. Read and checked in
    ``init_app``: a bad or missing configuration fails there, loudly, not at the first
    request.
``AI_SAAS_REDIS_URL``
    Overrides ``redis.url`` (else ``REDIS_URL``, else localhost).

Apps that sign their users in pass ``resolver``, a function of the
:class:`flask.Request` that returns the user's tenant id, or None to let the API key
decide::

    AISaaS(app, resolver=lambda request: current_user.tenant_id
                                         if current_user.is_authenticated else None)

How it works: :class:`AISaaS` wraps ``app.wsgi_app`` in the plain WSGI middleware of
:mod:`ai_saas_middleware.wsgi`, so Flask, Bottle or Pyramid apps share one code path
for admission, refusals, headers and settlement. Admission happens before Flask
dispatches the request: a refused request never reaches a view (nor the app's
``before_request`` hooks), and the response body, streamed or not, is metered to its
end. So the resolver runs in a request context pushed for it alone, before the view's:
``request``, ``session``, ``current_app`` and what builds on them (Flask-Login's
``current_user``) work there; the app's ``before_request`` hooks have not run yet, and
what the resolver puts on ``g`` is not seen by the view. (Its context is popped as
usual, so ``teardown_request`` functions run for it too.)
Settlement happens once, after the client has every byte: for a response of declared
length (a JSON body) when the server has taken its last chunk, for a stream
(``stream_with_context``) when the server closes it, that is after the stream's end was
written or the client went away (what was produced is billed).

Wrap ``app.wsgi_app`` in other WSGI middleware (Werkzeug's ``ProxyFix`` ...) *after*
``init_app``, so that it runs first and the resolver sees what it fixed.

In tests, Flask's test client reads a response body only when asked (``.data``,
``.get_json()``, or ``buffered=True``) and closes it only on ``.close()`` or at the
end of a ``with`` block: read a JSON response, and close a streamed one, before looking
at usage or quotas.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

try:
    from flask import Blueprint, Flask, Request, Response, current_app, g, request
except ImportError as exc:  # pragma: no cover - exercised by a test that hides Flask
    raise ImportError("ai_saas_middleware.flask needs Flask: "
                      "pip install 'ai-saas-middleware[flask]'") from exc

from .errors import ConfigError, ConfigProblem, RequestRefused
from .gateway import Gateway
from .wsgi import (
    ENVIRON_KEY,
    AISaaSMiddleware,
    ConfigSource,
    Environ,
    Resolver,
    StartResponse,
    UsageApp,
)

__all__ = [
    "AI_SAAS_CONFIG",
    "AI_SAAS_REDIS_URL",
    "EXTENSION_KEY",
    "AISaaS",
    "AISaaSState",
    "usage_blueprint",
]

AI_SAAS_CONFIG = "AI_SAAS_CONFIG"
"""``app.config`` key: the configuration (YAML path, dict or Config)."""
AI_SAAS_REDIS_URL = "AI_SAAS_REDIS_URL"
"""``app.config`` key: overrides ``redis.url``."""
EXTENSION_KEY = "ai_saas"
"""The key of this extension's :class:`AISaaSState` in ``app.extensions``."""

RequestResolver = Callable[[Request], "str | None"]


@dataclass(frozen=True, slots=True)
class AISaaSState:
    """What :class:`AISaaS` keeps for one app, at ``app.extensions["ai_saas"]``."""

    extension: AISaaS
    gateway: Gateway
    resolver: RequestResolver | None


class AISaaS:
    """The Flask extension: the WSGI middleware on ``app.wsgi_app``, ``g.ai`` for views.

    Args:
        app: the app to set up now; or call :meth:`init_app` later (app factories).
            One extension may serve several apps, each with its own configuration.
        config: a YAML path, a dict or a Config; else ``app.config["AI_SAAS_CONFIG"]``.
        resolver: ``flask.Request -> tenant id | None``, for apps whose users are
            signed in (None defers to the API key).
        gateway: a sync :class:`~ai_saas_middleware.Gateway` to use (and share) instead
            of building one from the configuration.
        redis_url: overrides ``redis.url``; else ``app.config["AI_SAAS_REDIS_URL"]``.
    """

    def __init__(self, app: Flask | None = None, config: ConfigSource | None = None, *,
                 resolver: RequestResolver | None = None, gateway: Gateway | None = None,
                 redis_url: str | None = None):
        self.config = config
        self.resolver = resolver
        self.shared_gateway = gateway
        self.redis_url = redis_url
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the configuration, wrap ``app.wsgi_app``, and set ``g.ai`` per request.

        Raises:
            ConfigError: no configuration, or a configuration with problems.
            RuntimeError: the app already has this extension.
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(f"AISaaS is already set up on app {app.name!r}")
        gateway = self.shared_gateway
        if gateway is None:
            source = self.config if self.config is not None else app.config.get(AI_SAAS_CONFIG)
            if source is None:
                raise ConfigError([ConfigProblem(
                    f"app.config[{AI_SAAS_CONFIG!r}]",
                    "a YAML path, a dict or a Config (or AISaaS(config=...))", "nothing")])
            gateway = Gateway(source, redis_url=self.redis_url
                              or app.config.get(AI_SAAS_REDIS_URL))
        middleware_resolver = (_in_request_context(app, self.resolver)
                               if self.resolver is not None else None)
        app.wsgi_app = AISaaSMiddleware(  # type: ignore[method-assign]
            app.wsgi_app, gateway=gateway, resolver=middleware_resolver)
        app.extensions[EXTENSION_KEY] = AISaaSState(self, gateway, self.resolver)
        # First of the app's hooks, so that the others (and any that answer early) see it.
        app.before_request_funcs.setdefault(None, []).insert(0, _context_to_g)
        # ctx.execute / ctx.complete out of models (NoHealthyModel): its 503, or
        # routing.defaultResponse, is the answer, not Flask's 500.
        app.register_error_handler(RequestRefused, _refusal_response)

    @property
    def gateway(self) -> Gateway:
        """The gateway of the current app (in a request or app context)."""
        return _state(current_app).gateway


def _state(app: Flask) -> AISaaSState:
    state = app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, AISaaSState):
        raise RuntimeError(f"AISaaS is not set up on app {app.name!r}: call "
                           "AISaaS(app) or ai_saas.init_app(app) first")
    return state


def _context_to_g() -> None:
    g.ai = request.environ.get(ENVIRON_KEY)


def _refusal_response(exc: RequestRefused) -> Response:
    decision = exc.decision
    return Response(decision.body, status=decision.status, headers=list(decision.headers))


def _in_request_context(app: Flask, resolver: RequestResolver) -> Resolver:
    """The middleware's ``environ -> tenant`` hook: ``resolver`` in a request context.

    The middleware admits a request before Flask has pushed a request context for it,
    so one is pushed here, for the resolver alone (session, ``current_user`` ...).
    """
    def resolve(environ: Environ) -> str | None:
        with app.request_context(environ) as ctx:
            return resolver(ctx.request)

    return resolve


# ---------------------------------------------------------------------- usage endpoint

usage_blueprint = Blueprint("ai_saas", __name__)
"""``GET /usage`` (or ``/usage/``): the caller's own usage this month, as JSON
(``url_for("ai_saas.usage")`` gives ``/usage``).

Credentials as for AI requests: the API key, or the extension's resolver. Register it
where the tenant's clients can reach it::

    app.register_blueprint(usage_blueprint, url_prefix="/ai-saas")

Both forms of the path are answered directly, as on Django (whose ``urls`` answer both
too): no redirect from one to the other, which a client sending its key in a header or
a POST could lose.
"""

_USAGE_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


def usage() -> Callable[[Environ, StartResponse], Iterable[bytes]]:
    """The caller's own usage this month (JSON), or the core's refusal."""
    # Other methods than GET get the same JSON 405 as on the other frameworks.
    state = _state(current_app)
    user_resolver = state.resolver
    resolver: Resolver | None = None
    if user_resolver is not None:
        def resolver(environ: Environ) -> str | None:  # in this request's own context
            return user_resolver(request._get_current_object())  # type: ignore[attr-defined]

    return UsageApp(state.gateway, resolver)  # a WSGI app: Flask runs it as the response


# "/usage" first: url_for builds with the first rule of the endpoint. Each rule matches
# its own form exactly, so Werkzeug redirects neither to the other.
usage_blueprint.add_url_rule("/usage", view_func=usage, methods=_USAGE_METHODS)
usage_blueprint.add_url_rule("/usage/", view_func=usage, methods=_USAGE_METHODS)
