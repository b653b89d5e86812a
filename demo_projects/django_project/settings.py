"""Settings of the Django demo: a small SaaS whose AI endpoints go through the middleware.

The AI_SAAS configuration is the Starlette demo's file (the same tenants, tiers and
models for every framework's demo); ``AI_SAAS_CONFIG`` points elsewhere. The provider
stand-in's URL comes from ``PROVIDER_URL``; Redis from the config, else ``REDIS_URL``.
No database: the demo's tenants authenticate with API keys.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "ai_saas_middleware.django",  # manage.py check validates AI_SAAS (ai_saas.E001 ...)
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    # As in Django's default MIDDLEWARE: the AI views need no @csrf_exempt, requests
    # authenticated by API key are exempt (see views.py).
    "django.middleware.csrf.CsrfViewMiddleware",
    "ai_saas_middleware.django.AISaaSMiddleware",
]
ROOT_URLCONF = "demo_projects.django_project.urls"
WSGI_APPLICATION = "demo_projects.django_project.wsgi.application"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

AI_SAAS = {
    "CONFIG": os.environ.get("AI_SAAS_CONFIG",
                             BASE_DIR.parent / "starlette_app" / "ai-saas-config.yaml"),
}
PROVIDER_URL = os.environ.get("PROVIDER_URL", "http://127.0.0.1:8001")
