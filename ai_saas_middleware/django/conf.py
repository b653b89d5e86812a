"""The ``AI_SAAS`` setting, read through one small typed object (``conf.ai_saas``).

::

    AI_SAAS = {
        "CONFIG": BASE_DIR / "ai-saas-config.yaml",  # or the config as a dict, or a Config
        "RESOLVER": "myapp.tenancy.tenant_of",       # optional: dotted path or callable
        "REDIS_URL": "redis://127.0.0.1:6379/0",     # optional: overrides redis.url
    }

Values are read from ``django.conf.settings`` on every access, so ``override_settings``
works; :meth:`Settings.problems` says what is wrong with the setting's shape (the
system checks report it, the middleware refuses to start on it).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Union

from django.conf import settings
from django.utils.module_loading import import_string

from ..config import Config

__all__ = ["KEYS", "ConfigSource", "Resolver", "Settings", "ai_saas"]

ConfigSource = Union[Config, Mapping[str, Any], str, "os.PathLike[str]"]
Resolver = Callable[[Any], str | Awaitable[str | None] | None]

SETTING = "AI_SAAS"
KEYS = ("CONFIG", "RESOLVER", "REDIS_URL")


class Settings:
    """Typed access to ``settings.AI_SAAS``."""

    @property
    def defined(self) -> bool:
        """Whether the project has an ``AI_SAAS`` setting at all."""
        return hasattr(settings, SETTING)

    @property
    def raw(self) -> Any:
        return getattr(settings, SETTING, None)

    def _get(self, key: str) -> Any:
        raw = self.raw
        return raw.get(key) if isinstance(raw, Mapping) else None

    @property
    def CONFIG(self) -> ConfigSource:
        value: ConfigSource = self._get("CONFIG")
        return value

    @property
    def RESOLVER(self) -> Resolver | None:
        value = self._get("RESOLVER")
        if isinstance(value, str):
            value = import_string(value)
        return value  # type: ignore[no-any-return]

    @property
    def REDIS_URL(self) -> str | None:
        value: str | None = self._get("REDIS_URL")
        return value

    def problems(self) -> list[tuple[str, str]]:
        """What is wrong with the setting's shape, as (key, message) pairs; [] when fine.

        The configuration itself is not loaded here (see ``checks``).
        """
        if not self.defined:
            return [("", "the AI_SAAS setting is missing")]
        raw = self.raw
        if not isinstance(raw, Mapping):
            return [("", f"AI_SAAS must be a dict, found {type(raw).__name__}")]
        out: list[tuple[str, str]] = []
        unknown = sorted(str(k) for k in raw if k not in KEYS)
        if unknown:
            out.append(("", f"AI_SAAS has unknown keys {', '.join(unknown)}; it takes "
                            f"{', '.join(KEYS)}"))
        config = raw.get("CONFIG")
        if config is None:
            out.append(("CONFIG", "AI_SAAS['CONFIG'] is missing: a YAML path, a dict or a "
                                  "Config"))
        elif not isinstance(config, (str, os.PathLike, Mapping, Config)):
            out.append(("CONFIG", "AI_SAAS['CONFIG'] must be a YAML path, a dict or a Config, "
                                  f"found {type(config).__name__}"))
        resolver = raw.get("RESOLVER")
        if isinstance(resolver, str):
            try:
                resolver = import_string(resolver)
            except ImportError as exc:
                out.append(("RESOLVER", f"AI_SAAS['RESOLVER'] {raw['RESOLVER']!r} cannot be "
                                        f"imported: {exc}"))
                resolver = None
        if resolver is not None and not callable(resolver):
            out.append(("RESOLVER", "AI_SAAS['RESOLVER'] must be a callable (or its dotted "
                                    f"path), found {type(resolver).__name__}"))
        url = raw.get("REDIS_URL")
        if url is not None and not isinstance(url, str):
            out.append(("REDIS_URL", f"AI_SAAS['REDIS_URL'] must be a string, found "
                                     f"{type(url).__name__}"))
        return out


ai_saas = Settings()
