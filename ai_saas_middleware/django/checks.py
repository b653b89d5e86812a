"""System checks of the ``AI_SAAS`` setting (``manage.py check``, ``runserver``'s start).

=================  =====================================================================
``ai_saas.E001``   a problem in the configuration; one message per problem, its config
                   path first (``tenant.tiers[1].rateLimit: expected ..., found ...``)
``ai_saas.E002``   the ``AI_SAAS`` setting is missing
``ai_saas.E003``   ``AI_SAAS`` is not a dict, has unknown keys, or lacks ``CONFIG``
``ai_saas.E004``   ``AI_SAAS['RESOLVER']`` cannot be imported or is not callable
``ai_saas.E005``   ``AI_SAAS['REDIS_URL']`` is not a string
``ai_saas.W001``   a ``RESOLVER`` is set but the middleware comes before
                   ``AuthenticationMiddleware`` (``request.user`` is not set yet)
=================  =====================================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning

from ..config import load_config
from ..errors import ConfigError, ConfigProblem
from .conf import ai_saas

__all__ = ["check_ai_saas", "config_problems"]

MIDDLEWARE_PATHS = ("ai_saas_middleware.django.AISaaSMiddleware",
                    "ai_saas_middleware.django.middleware.AISaaSMiddleware")
AUTH_MIDDLEWARE = "django.contrib.auth.middleware.AuthenticationMiddleware"
SETTING_HINT = "AI_SAAS = {'CONFIG': BASE_DIR / 'ai-saas-config.yaml'}"
_SHAPE_IDS = {"": "ai_saas.E003", "CONFIG": "ai_saas.E003", "RESOLVER": "ai_saas.E004",
              "REDIS_URL": "ai_saas.E005"}


def _source(config: Any) -> str:
    if isinstance(config, (str, os.PathLike)):
        return os.fspath(config)
    return "AI_SAAS['CONFIG']"


def config_problems(config: str | os.PathLike[str] | Mapping[str, Any]
                    ) -> list[ConfigProblem]:
    """Every problem of the configuration ``config`` names (a YAML path or a dict)."""
    try:
        load_config(config)
    except ConfigError as exc:
        return list(exc.problems)
    return []


def check_ai_saas(app_configs: Sequence[AppConfig] | None = None,
                  **kwargs: Any) -> list[CheckMessage]:
    """Every problem of the ``AI_SAAS`` setting and of the configuration it names."""
    if not ai_saas.defined:
        return [Error("the AI_SAAS setting is missing", hint=SETTING_HINT, id="ai_saas.E002")]
    messages: list[CheckMessage] = [
        Error(message, hint=SETTING_HINT if key in ("", "CONFIG") else None,
              id=_SHAPE_IDS[key])
        for key, message in ai_saas.problems()]
    # The configuration is checked whenever CONFIG is one, whatever else is wrong with the
    # setting (an unknown key, a bad RESOLVER): one run reports every problem.
    config = ai_saas.CONFIG
    if isinstance(config, (str, os.PathLike, Mapping)):
        messages += [Error(str(problem), obj=_source(config), id="ai_saas.E001")
                     for problem in config_problems(config)]
    middleware = list(getattr(settings, "MIDDLEWARE", None) or ())
    ours = next((i for i, name in enumerate(middleware) if name in MIDDLEWARE_PATHS), None)
    if ai_saas._get("RESOLVER") is not None and ours is not None \
            and AUTH_MIDDLEWARE in middleware[ours:]:
        messages.append(Warning(
            "AISaaSMiddleware comes before AuthenticationMiddleware in MIDDLEWARE, so the "
            "RESOLVER sees no request.user", hint="move it after AuthenticationMiddleware",
            id="ai_saas.W001"))
    return messages
