"""The Django app: add ``"ai_saas_middleware.django"`` to ``INSTALLED_APPS`` for the checks."""

from __future__ import annotations

from django.apps import AppConfig
from django.core import checks


class AISaaSConfig(AppConfig):  # type: ignore[misc]  # Django ships no type hints
    name = "ai_saas_middleware.django"
    label = "ai_saas"
    verbose_name = "AI SaaS middleware"

    def ready(self) -> None:
        from .checks import check_ai_saas

        checks.register(check_ai_saas)
