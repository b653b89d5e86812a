"""The provider layer: call a model's provider and get its reply plus its real usage.

Configured under ``providers:`` (see docs/configuration.md) and named by each model
profile's ``provider``. Built in: OpenAI-compatible chat completions
(:mod:`.openai`) and Anthropic's Messages API (:mod:`.anthropic`), sync over urllib3
and async over aiohttp (``pip install 'ai-saas-middleware[providers]'``; chosen by
measurement, see :mod:`.transport`)::

    from ai_saas_middleware.providers import build_providers, is_failure

    providers = build_providers(config)
    provider = providers.provider_for(config.models[model_id])
    reply = provider.complete(model_id, [{"role": "user", "content": "Hi"}], max_tokens=64)
    reply.text, reply.prompt_tokens, reply.completion_tokens

    stream = provider.astream(model_id, messages, max_tokens=64)
    try:
        async for delta in stream:
            ...
    except ProviderError:
        if not stream.started: ...            # nothing reached the client: fall back
        else: ...                             # cut: bill stream.text, mark it truncated

Importing this package imports no HTTP library.
"""

from __future__ import annotations

from .base import (
    AsyncProviderStream,
    MalformedReply,
    Message,
    Provider,
    ProviderConnectionError,
    ProviderError,
    ProviderHTTPError,
    ProviderNotConfigured,
    ProviderStream,
    ProviderTimeout,
    Reply,
    StreamCut,
)
from .failures import is_failure, status_of
from .registry import PROVIDER_CLASSES, Providers, build_provider, build_providers

__all__ = [
    "PROVIDER_CLASSES",
    "AsyncProviderStream",
    "MalformedReply",
    "Message",
    "Provider",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderHTTPError",
    "ProviderNotConfigured",
    "ProviderStream",
    "ProviderTimeout",
    "Providers",
    "Reply",
    "StreamCut",
    "build_provider",
    "build_providers",
    "is_failure",
    "status_of",
]
