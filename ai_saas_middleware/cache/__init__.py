"""The per-tenant semantic cache: deciding whether two requests are the same question.

* :mod:`.request_key`: exact key, partition key and semantic text of a chat request;
  :func:`cacheable` (no numpy).
* :mod:`.guard`: the lexical trap guard and the :class:`Verifier` protocol (no numpy).
* :mod:`.embedders`, :mod:`.calibration`, :mod:`.match`: vectors, what a similarity
  threshold means, and the vectorised match (need numpy:
  ``pip install 'ai-saas-middleware[cache]'``).
"""

from __future__ import annotations

from .guard import LexicalGuard, Verifier
from .request_key import Cacheability, RequestKeys, cacheable, request_keys

__all__ = ["Cacheability", "LexicalGuard", "RequestKeys", "Verifier", "cacheable",
           "request_keys"]
