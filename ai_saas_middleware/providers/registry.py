"""From ``providers:`` to provider objects: :func:`build_providers` and :class:`Providers`.

::

    providers = build_providers(config)           # reads each apiKeyEnv now
    provider = providers.provider_for(config.models["gpt-4o-mini"])
    reply = await provider.acomplete("gpt-4o-mini", messages, max_tokens=256)
    ...
    await providers.aclose()                      # at shutdown
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from ..config import Config, ModelProfile, ProviderConfig
from ..errors import ConfigError, ConfigProblem
from .anthropic import AnthropicProvider
from .base import Provider, ProviderError, ProviderNotConfigured
from .http import HTTPProvider
from .openai import OpenAIProvider

__all__ = ["PROVIDER_CLASSES", "Providers", "build_provider", "build_providers"]

# kind -> the class that speaks its API
PROVIDER_CLASSES: Mapping[str, Callable[[ProviderConfig, str | None], HTTPProvider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
}


def build_provider(config: ProviderConfig, api_key: str | None = None) -> HTTPProvider:
    """The provider of one ``providers:`` entry (``api_key``: instead of its env var)."""
    return PROVIDER_CLASSES[config.kind](config, api_key)


class Providers(Mapping[str, Provider]):
    """The configured providers by id; :meth:`provider_for` finds a model's."""

    def __init__(self, providers: Mapping[str, Provider]) -> None:
        self._providers = dict(providers)

    def __getitem__(self, provider_id: str) -> Provider:
        return self._providers[provider_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._providers)

    def __len__(self) -> int:
        return len(self._providers)

    def provider_for(self, model: ModelProfile) -> Provider:
        """The provider that serves ``model`` (its profile's ``provider``).

        Raises:
            ProviderNotConfigured: no ``providers:`` entry has that id.
        """
        provider = self._providers.get(model.provider)
        if provider is None:
            configured = ", ".join(sorted(self._providers)) or "none"
            raise ProviderNotConfigured(
                f"model {model.id!r} names provider {model.provider!r}, which providers: "
                f"does not configure (configured: {configured})")
        return provider

    def close(self) -> None:
        """Close every provider's sync connections."""
        for provider in self._providers.values():
            provider.close()

    async def aclose(self) -> None:
        """Close every provider's connections (async ones on the running loop)."""
        for provider in self._providers.values():
            await provider.aclose()


def build_providers(config: Config) -> Providers:
    """Build every provider of ``config.providers``, reading each ``apiKeyEnv`` now.

    No connection is made and no HTTP library imported until the first call.

    Raises:
        ConfigError: listing every entry whose ``apiKeyEnv`` variable is not set (by the
            variable's name; a key is never shown).
    """
    built: dict[str, Provider] = {}
    problems: list[ConfigProblem] = []
    for i, (provider_id, entry) in enumerate(config.providers.items()):
        try:
            built[provider_id] = build_provider(entry)
        except ProviderError:
            problems.append(ConfigProblem(f"providers[{i}].apiKeyEnv",
                                          "the name of a set environment variable",
                                          f"{entry.api_key_env} is not set"))
    if problems:
        raise ConfigError(problems, config.source)
    return Providers(built)
