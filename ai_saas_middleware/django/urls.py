"""URLs to ``include()``: the tenant's own usage endpoint (and the dashboard, when it lands).

::

    urlpatterns = [..., path("ai-saas/", include("ai_saas_middleware.django.urls"))]

``GET ai-saas/usage/`` (or ``ai-saas/usage``, answered directly, not redirected: a
redirect would lose a POST or, for some clients, the key's header; Flask answers both
forms too) answers the caller's usage this month as JSON (tokens used and left, requests
in the last minute, the tier's limits and models); ``reverse("ai_saas:usage")`` gives the
form with the slash. Credentials as for
AI requests: the API key, or the ``RESOLVER`` of ``AI_SAAS``. It is a plain sync view
(under ASGI Django runs it in its worker thread): it is not on the hot path.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from ..types import RequestInfo
from .conf import ai_saas
from .middleware import get_gateway, render, request_headers, resolve_tenant

__all__ = ["app_name", "urlpatterns", "usage"]

app_name = "ai_saas"


@csrf_exempt  # type: ignore[untyped-decorator]  # any other method gets the core's 405, not Django's CSRF 403
def usage(request: HttpRequest) -> HttpResponse:
    """The caller's own usage this month (JSON), or the core's refusal."""
    method = request.method or "GET"
    resolver = ai_saas.RESOLVER
    tenant = None if resolver is None else resolve_tenant(resolver, request)
    info = RequestInfo(method, request.path_info, request_headers(request), b"", tenant)
    return render(get_gateway(False).usage(info))


urlpatterns = [path("usage/", usage, name="usage"), path("usage", usage)]
