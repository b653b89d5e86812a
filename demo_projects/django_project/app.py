"""The Django demo as an app factory, for ``ai-saas demo --framework django``.

``create_app(config, provider_url=...)`` returns the demo's ASGI application with the
middleware built on ``config`` (a path, a dict or a Config). In a process without Django
settings (the ``ai-saas`` command) it configures Django with the demo's settings; in one
that has them already (a test run), the demo's settings must be in force (e.g. inside
``override_settings(**demo_settings())``).

Run it on its own: ``PROVIDER_URL=... uvicorn demo_projects.django_project.asgi:application``
(the provider stand-in: ``uvicorn demo_projects.provider:app --port 8001``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import django
from django.conf import settings

CONFIG = Path(__file__).resolve().parent.parent / "starlette_app" / "ai-saas-config.yaml"
URLCONF = "demo_projects.django_project.urls"


def demo_settings() -> dict[str, Any]:
    """The settings of ``settings.py``, as keyword arguments."""
    from . import settings as module

    return {name: getattr(module, name) for name in dir(module) if name.isupper()}


def create_app(config: Any = CONFIG, provider_url: str | None = None,
               redis_url: str | None = None) -> Any:
    """The demo's ASGI app; ``provider_url`` is the OpenAI-compatible base URL to call."""
    from django.core.exceptions import ImproperlyConfigured
    from django.core.handlers.asgi import ASGIHandler
    from django.test.utils import override_settings

    if not settings.configured:
        settings.configure(**demo_settings())
        django.setup()
    elif settings.ROOT_URLCONF != URLCONF:
        raise ImproperlyConfigured("the Django demo needs its own settings in force: run it "
                                   "in a process of its own (ai-saas demo --framework django) "
                                   "or inside override_settings(**demo_settings())")
    if provider_url is not None:
        settings.PROVIDER_URL = provider_url  # start-up, before any request reads it
    with override_settings(AI_SAAS={"CONFIG": config, "REDIS_URL": redis_url}):
        return ASGIHandler()  # its middleware is built, with this config, now
