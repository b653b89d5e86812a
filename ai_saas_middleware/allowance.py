"""Per-process admission while Redis is unreachable (``onUnavailable: open``).

:class:`LocalAllowance`: while Redis cannot be reached, each process admits a tenant at
most its tier's rate limit per minute, and at most a tenth of its tier's monthly quota
in tokens **per rolling 30 days**: the token budget is not renewed when Redis comes
back, so a Redis that flaps (down, up, down again) allows no more than one that stays
down. Tokens leave the budget 30 to 31 days after they were taken (spending is kept by
day, and the day the window's start falls in is counted whole, so the count never
falls short of what a 30-day window holds).

Worst case, in tokens admitted that Redis never counted before admission: in any 30
days, ``quota / 10`` per process that ran during an outage (``P`` processes: ``P *
quota / 10``, e.g. 20 processes on a 100,000-token tier: 200,000 tokens beside the
100,000 counted in Redis). The allowance lives in the process's memory, so a process
started afresh (a deploy, a crash) brings a fresh allowance: ``P`` counts every
process started in those 30 days, not only those running at once. Requests per
minute: the tier's rate limit per process. Every locally admitted request is still
billed: its event is spooled and replayed when Redis returns.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .config import TierConfig

__all__ = ["LocalAllowance"]

_DAY_S = 86_400


class LocalAllowance:
    """Per-process admission while Redis is unreachable.

    Args:
        clock: seconds, monotonic (a test may pass its own to step through a month).
    """

    QUOTA_SHARE = 10  # a process may spend 1/10 of a tier's monthly quota ...
    PERIOD_DAYS = 30  # ... in any window of this many days, however many outages

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._times: dict[str, deque[float]] = {}
        # tenant -> [day, tokens] of each day with local admissions, oldest first
        self._spent: dict[str, deque[list[int]]] = {}

    def spent(self, tenant_id: str) -> int:
        """Tokens admitted locally for ``tenant_id`` that still count against its budget."""
        with self._lock:
            return self._spent_now(tenant_id, int(self._clock() // _DAY_S))

    def _spent_now(self, tenant_id: str, today: int) -> int:
        days = self._spent.get(tenant_id)
        if not days:
            return 0
        # Kept: today and the PERIOD_DAYS days before it, which cover any 30-day window
        # that ends now (its first day counted whole).
        while days and days[0][0] < today - self.PERIOD_DAYS:
            days.popleft()
        return sum(tokens for _, tokens in days)

    def forget_expired(self) -> None:
        """Drop what no longer counts (tenants whose minute and 30 days have passed).

        Called when Redis is back. It renews nothing: the budget of a tenant that
        spent it during this outage stays spent for the next one."""
        now = self._clock()
        today = int(now // _DAY_S)
        with self._lock:
            for tenant_id in list(self._spent):
                if not self._spent_now(tenant_id, today):
                    del self._spent[tenant_id]
            for tenant_id, times in list(self._times.items()):
                if not times or times[-1] <= now - 60:
                    del self._times[tenant_id]

    def requests_left(self, tenant_id: str, rate_limit: int, window_ms: int
                      ) -> tuple[int, int]:
        """What the rate limit has left for ``tenant_id`` in this process: (requests
        that may still be admitted in the current window, ms until its oldest admission
        leaves the window, or ``window_ms`` when it holds none). Read only."""
        now = self._clock()
        start = now - window_ms / 1000
        with self._lock:
            inside = [t for t in self._times.get(tenant_id, ()) if t > start]
        reset_ms = int((inside[0] - start) * 1000) + 1 if inside else window_ms
        return max(0, rate_limit - len(inside)), min(reset_ms, window_ms)

    def take(self, tenant_id: str, tier: TierConfig, tokens: int, window_ms: int
             ) -> list[Any] | None:
        """None when admitted; else a reply shaped like admit.lua's refusals."""
        now = self._clock()
        today = int(now // _DAY_S)
        now_ms = int(time.time() * 1000)
        with self._lock:
            times = self._times.setdefault(tenant_id, deque())
            while times and times[0] <= now - window_ms / 1000:
                times.popleft()
            if tier.rate_limit and len(times) >= tier.rate_limit:
                return [1, now_ms, int((times[0] + window_ms / 1000 - now) * 1000) + 1]
            if tier.monthly_quota is not None:
                spent = self._spent_now(tenant_id, today)
                budget = tier.monthly_quota // self.QUOTA_SHARE
                if spent + tokens > budget:
                    return [2, now_ms, budget - spent, spent]
            times.append(now)
            days = self._spent.setdefault(tenant_id, deque())
            if days and days[-1][0] == today:
                days[-1][1] += tokens
            else:
                days.append([today, tokens])
        return None
