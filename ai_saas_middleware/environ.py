"""Request glue of WSGI environs, shared by the adapters built on them (the WSGI
middleware, Django's ``request.META``). No framework imports; :mod:`ai_saas_middleware.wsgi`
re-exports these names, their earlier home."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["environ_headers", "request_path"]

_HEADER_NAMES: dict[str, str] = {}  # environ key -> header name ("" for other keys)
_HEADER_NAMES_MAX = 512  # the keys are the client's header names: cache a bounded few


def environ_headers(environ: Mapping[str, Any]) -> dict[str, str]:
    """The request headers of a WSGI environ, with lower-case names."""
    headers = {}
    names = _HEADER_NAMES
    for key, value in environ.items():
        name = names.get(key)
        if name is None:  # the usual keys are worked out once per process
            name = key[5:].replace("_", "-").lower() if key.startswith("HTTP_") else ""
            if len(names) < _HEADER_NAMES_MAX:
                names[key] = name
        if name:
            headers[name] = value
    content_type = environ.get("CONTENT_TYPE")
    if content_type:
        headers["content-type"] = content_type
    content_length = environ.get("CONTENT_LENGTH")
    if content_length:
        headers["content-length"] = content_length
    return headers


def request_path(environ: Mapping[str, Any]) -> str:
    """``PATH_INFO`` as text: WSGI hands it over as latin-1-decoded bytes, ASGI as UTF-8."""
    path: str = environ.get("PATH_INFO", "")
    try:
        return path.encode("latin-1").decode("utf-8")
    except UnicodeError:  # not valid UTF-8, or a server that already decoded it
        return path
