"""Which exceptions count against a model's circuit breaker: :func:`is_failure`.

The rule (issue 9): timeouts, connection errors, 5xx and a provider's 429 are failures
of the model; a client's 4xx (a bad request, a wrong key, a prompt too long) is not: it
would fail on every model, and must not open a healthy model's breaker.

It classifies our :class:`~ai_saas_middleware.providers.base.ProviderError` (its
``failure`` flag) and what an app's own ``call(model)`` raises: builtin
``ConnectionError`` / ``TimeoutError`` (``asyncio.TimeoutError`` included), httpx's
transport errors, aiohttp's connection and timeout errors, urllib3's and requests'
connection and timeout errors, the OpenAI and Anthropic SDKs' ``APIConnectionError``,
and any exception carrying an HTTP status as ``status_code``, ``status``,
``http_status`` or ``response.status_code`` (the SDKs' ``APIStatusError``,
``httpx.HTTPStatusError``, ``aiohttp.ClientResponseError``). An exception raised
``from`` one of these (its ``__cause__``) is classified by its cause.

No HTTP library is imported here: a library's exceptions are looked up only when the
library is already in ``sys.modules`` (an exception of a library nobody imported
cannot exist).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from .base import ProviderError

__all__ = ["is_failure", "status_of"]

_STATUS_ATTRS = ("status_code", "status", "http_status")
_MAX_CAUSES = 5  # how far down a chain of ``raise ... from`` is followed

# module name -> dotted names of its exception classes that are failures
_TRANSPORT_ERRORS: dict[str, tuple[str, ...]] = {
    "httpx": ("TransportError",),  # TimeoutException, ConnectError, ReadError, ...
    "aiohttp": ("ClientConnectionError", "ClientPayloadError"),  # + ServerTimeoutError
    "urllib3": ("exceptions.TimeoutError", "exceptions.NewConnectionError",
                "exceptions.ProtocolError"),
    "requests": ("exceptions.ConnectionError", "exceptions.Timeout",
                 "exceptions.ChunkedEncodingError"),
    "openai": ("APIConnectionError",),  # APITimeoutError is one
    "anthropic": ("APIConnectionError",),
}


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an exception carries, or ``None`` (a bool or a value outside
    100-599 is not one)."""
    for attr in _STATUS_ATTRS:
        status = _http_status(getattr(exc, attr, None))
        if status is not None:
            return status
    response = getattr(exc, "response", None)
    if response is not None:
        return _http_status(getattr(response, "status_code", None))
    return None


def _http_status(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return value
    return None


def _transport_classes() -> tuple[type[BaseException], ...]:
    classes: list[type[BaseException]] = []
    for module_name, names in _TRANSPORT_ERRORS.items():
        module = sys.modules.get(module_name)
        if module is None:
            continue
        for dotted in names:
            target: Any = module
            for part in dotted.split("."):
                target = getattr(target, part, None)
            if isinstance(target, type) and issubclass(target, BaseException):
                classes.append(target)
    return tuple(classes)


def is_failure(exc: BaseException) -> bool:
    """Whether ``exc`` counts as a failure of the model that raised it.

    Args:
        exc: what a provider call (ours, or the app's own ``call(model)``) raised.

    Returns:
        True for timeouts, connection errors, 5xx and 429; False for a client's 4xx and
        for anything else (a bug in the handler is not the model's fault).
    """
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < _MAX_CAUSES:
        verdict = _classify(current)
        if verdict is not None:
            return verdict
        current = current.__cause__
        seen += 1
    return False


def _classify(exc: BaseException) -> bool | None:
    """True or False when ``exc`` itself decides, None when it says nothing."""
    if isinstance(exc, ProviderError):
        return exc.failure
    status = status_of(exc)
    if status is not None:
        return status >= 500 or status == 429
    # asyncio.TimeoutError is TimeoutError from 3.11 on, a class of its own before.
    if isinstance(exc, (TimeoutError, ConnectionError, asyncio.TimeoutError)):
        return True
    transport = _transport_classes()
    if transport and isinstance(exc, transport):
        return True
    return None
