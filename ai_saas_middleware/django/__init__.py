"""Django adapter: ``MIDDLEWARE``, the ``AI_SAAS`` setting, system checks, usage URLs.

settings.py::

    INSTALLED_APPS = [
        ...,
        "ai_saas_middleware.django",          # system checks of AI_SAAS (ai_saas.E001 ...)
    ]
    MIDDLEWARE = [
        ...,
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "ai_saas_middleware.django.AISaaSMiddleware",   # after authentication
        ...,
    ]
    AI_SAAS = {
        "CONFIG": BASE_DIR / "ai-saas-config.yaml",     # or the config inline, as a dict
        "RESOLVER": "accounts.tenancy.tenant_of",       # optional, see below
        "REDIS_URL": os.environ.get("REDIS_URL"),       # optional: overrides redis.url
    }

urls.py::

    urlpatterns = [..., path("ai-saas/", include("ai_saas_middleware.django.urls"))]
    # GET /ai-saas/usage/ (or /ai-saas/usage): the calling tenant's usage this month, as JSON

A view on an AI endpoint (a path under ``endpoints:`` of the config)::

    def chat(request):           # no @csrf_exempt needed: see CSRF below
        ctx = request.ai         # tenant_id, tier, model, request_id, body, candidates ...
        reply = ctx.execute(lambda model: provider.chat(model.id, ctx.body,
                                                        max_tokens=ctx.max_output_tokens))
        return HttpResponse(reply.content, content_type="application/json")

    async def chat_stream(request):                       # under ASGI, async views stream
        ctx = request.ai
        return StreamingHttpResponse(relay_sse(ctx), content_type="text/event-stream")

What happens: a request to a path that matches no endpoint passes through untouched,
with no Redis call and its body unread. An AI request's body is read once, up to
``http.maxBodyBytes`` (else 413; Django's ``DATA_UPLOAD_MAX_MEMORY_SIZE`` does not apply
to it) and stays available as ``request.body``; the tenant is found from the API key
(``Authorization: Bearer`` or ``X-API-Key``) or the resolver, held to its tier and given
the cheapest model that meets the request's needs, in one Redis round trip. A refusal
is the core's JSON error (401, 413, 415, 422, 429 with ``Retry-After``, 503), the same
bytes and headers as on every other framework. An admitted response gets the
``X-Request-ID``, ``X-AI-Model`` and RateLimit headers and is settled after it was sent,
with the provider's usage read from the JSON body or the final SSE chunk (or what the
view reported with ``ctx.record_usage``), as one event in the usage stream. See
:mod:`ai_saas_middleware.django.middleware` for when exactly, for WSGI and ASGI,
whole and streamed responses, and the client that goes away mid-stream.

Sync and async: one middleware serves both. Under WSGI it uses the sync gateway;
under ASGI it runs on the event loop, and every Redis call awaits ``redis.asyncio`` (no
thread). Under ASGI, stream with an async iterator: Django consumes a sync iterator
whole before sending it.

CSRF (``CsrfViewMiddleware``, in Django's default ``MIDDLEWARE``): a request the
middleware authenticated by a header (the API key, ``Authorization: Bearer`` or
``X-API-Key``) is exempt from it, as Django REST framework exempts token authentication:
a browser cannot attach such a header to a cross-site request unless the app's CORS
policy lets it. A request whose tenant came from the ``RESOLVER`` (the session) is
checked, before admission, as Django would check it at the view: without a valid CSRF
token (``X-CSRFToken``) it gets Django's 403, takes no rate-limit slot and leaves no
usage event. A view marked ``@csrf_exempt`` stays exempt for both.

``RESOLVER``: a callable (or its dotted path) taking the request and returning a tenant
id or None (then the API key decides), for apps whose users are already signed in::

    def tenant_of(request):                       # called in a thread under ASGI
        user = request.user
        return user.organization.slug if user.is_authenticated else None

    async def tenant_of(request):                 # called on the loop under ASGI
        user = await request.auser()
        return ... if user.is_authenticated else None

Start-up: with the app installed, ``manage.py check`` (and ``runserver``) report every
problem of the setting and of the configuration, each with its config path
(``ai_saas.E001``; the ids are listed in :mod:`ai_saas_middleware.django.checks`). Under
any server the middleware refuses to start (``ImproperlyConfigured``) on a bad one.

Tests: with ``override_settings(AI_SAAS=...)`` the middleware built afterwards uses the
new configuration. Under ASGI, settlement runs in a task after the response;
``await ai_saas_middleware.bodies.wait_for_settlements()`` waits for it.
"""

from __future__ import annotations

try:
    import django  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError("ai_saas_middleware.django needs Django: "
                      "pip install 'ai-saas-middleware[django]'") from exc

from .middleware import AISaaSMiddleware

__all__ = ["AISaaSMiddleware"]
