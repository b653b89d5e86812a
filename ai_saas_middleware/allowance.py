"""Per-process admission while Redis is unreachable (``onUnavailable: open``).

:class:`LocalAllowance`: each process admits a tenant at most its tier's rate limit per
minute and at most a tenth of its monthly quota in tokens, until Redis is back (then the
allowance starts afresh).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from .config import TierConfig

__all__ = ["LocalAllowance"]


class LocalAllowance:
    """Per-process admission while Redis is unreachable."""

    QUOTA_SHARE = 10  # a process may spend 1/10 of a tier's monthly quota per outage

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._times: dict[str, deque[float]] = {}
        self._tokens: dict[str, int] = {}

    def reset(self) -> None:
        with self._lock:
            self._times.clear()
            self._tokens.clear()

    def take(self, tenant_id: str, tier: TierConfig, tokens: int, window_ms: int
             ) -> list[Any] | None:
        """None when admitted; else a reply shaped like admit.lua's refusals."""
        now = time.monotonic()
        now_ms = int(time.time() * 1000)
        with self._lock:
            times = self._times.setdefault(tenant_id, deque())
            while times and times[0] <= now - window_ms / 1000:
                times.popleft()
            if tier.rate_limit and len(times) >= tier.rate_limit:
                return [1, now_ms, int((times[0] + window_ms / 1000 - now) * 1000) + 1]
            spent = self._tokens.get(tenant_id, 0)
            if tier.monthly_quota is not None:
                budget = tier.monthly_quota // self.QUOTA_SHARE
                if spent + tokens > budget:
                    return [2, now_ms, budget - spent, spent]
            times.append(now)
            self._tokens[tenant_id] = spent + tokens
        return None
