"""Money budgets: what a tenant may spend per month and per day, in exact USD.

A tier sets ``monthlyBudget`` / ``dailyBudget``; a tenant of the configuration may set its
own. Redis counts spend in picodollars (10^-12 USD) as whole numbers: every price has at
most 12 decimal places (the configuration checks it once a budget exists), so every cost
is a whole number of them, and the counters are exact. Admission (admit.lua, the same
round trip as the tokens) reserves the worst-case cost of the models the request may
use: the dearest candidate's prompt plus every allowed output token, since a fallback may
land on any of them. Settlement (settle.lua) replaces the reservation by the event's real
cost. The month and the day are the server's (UTC).

While Redis is unreachable, requests admitted by the per-process allowance are not held
to the budget (the allowance bounds them); their spend is counted when their spooled
events are replayed.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterable
from decimal import Decimal

from .config import Config, ModelProfile, TierConfig, any_budget
from .pricing import MONEY, format_usd
from .responses import refusal
from .types import Decision

__all__ = ["PICODOLLARS", "Budgets", "from_picodollars", "to_picodollars"]

PICODOLLARS = 10 ** 12  # per USD

_UNSET = (-1, -1)


def to_picodollars(usd: Decimal) -> int:
    """``usd`` as whole picodollars, rounded up (exact for a cost of these prices)."""
    return int(MONEY.scaleb(usd, 12).to_integral_value(rounding="ROUND_CEILING", context=MONEY))


def from_picodollars(amount: int | str | bytes) -> Decimal:
    """Picodollars (an int or a Redis reply) as exact USD."""
    text = amount.decode() if isinstance(amount, bytes) else str(amount)
    return MONEY.scaleb(Decimal(text or "0"), -12)


class Budgets:
    """The budgets in force for each tenant, and what admission asks and answers of them."""

    def __init__(self, config: Config):
        self._tiers = {name: self._limits(t.monthly_budget, t.daily_budget)
                       for name, t in config.tiers.items()}
        self._tenants: dict[str, tuple[Decimal | None, Decimal | None]] = {
            t.id: (t.monthly_budget, t.daily_budget) for t in config.tenants.values()
            if t.monthly_budget is not None or t.daily_budget is not None}
        self.any = any_budget(config.tiers, config.tenants)

    @staticmethod
    def _limits(monthly: Decimal | None, daily: Decimal | None) -> tuple[int, int]:
        return (-1 if monthly is None else to_picodollars(monthly),
                -1 if daily is None else to_picodollars(daily))

    def limits(self, tenant_id: str, tier: TierConfig) -> tuple[int, int]:
        """(monthly, daily) budget in picodollars, -1 where none; (-1, -1): no budget."""
        own = self._tenants.get(tenant_id)
        if own is None:
            return self._tiers.get(tier.name, _UNSET)
        return self._limits(own[0] if own[0] is not None else tier.monthly_budget,
                            own[1] if own[1] is not None else tier.daily_budget)

    @staticmethod
    def worst_case(candidates: Iterable[ModelProfile], prompt_tokens: int,
                   max_output_tokens: int) -> int:
        """Picodollars of the dearest candidate's prompt plus every allowed output token."""
        worst = max(MONEY.fma(m.cost_per_input_token, prompt_tokens,
                              MONEY.multiply(m.cost_per_output_token, max_output_tokens))
                    for m in candidates)
        return max(1, to_picodollars(worst))  # 0 would mean "no money part" to admit.lua

    @staticmethod
    def refused(which: bytes | str, spent: bytes | str, reserve: int,
                limits: tuple[int, int], now_ms: int) -> Decision:
        """The 429 ``budget_exceeded`` for admit.lua's code 7."""
        monthly = (which.decode() if isinstance(which, bytes) else which) == "month"
        limit = limits[0] if monthly else limits[1]
        before = _int(spent) - reserve
        left = max(0, limit - before)
        now_s = now_ms // 1000
        t = time.gmtime(now_s)
        if monthly:
            end = calendar.timegm((t.tm_year + (t.tm_mon == 12), t.tm_mon % 12 + 1, 1, 0, 0, 0))
        else:
            end = (now_s // 86400 + 1) * 86400
        period = "monthly" if monthly else "daily"
        return refusal(
            "budget_exceeded",
            f"the {period} budget of ${format_usd(from_picodollars(limit))} cannot hold this "
            f"request's worst-case cost of ${format_usd(from_picodollars(reserve))} "
            f"(${format_usd(from_picodollars(left))} left this "
            f"{'month' if monthly else 'day'}, UTC)",
            retry_after_s=max(1, end - now_s))

    @staticmethod
    def share(spent: bytes | str, limit: int) -> float:
        """The share of ``limit`` spent (0 without a limit)."""
        if limit <= 0:
            return 0.0 if limit < 0 else 1.0
        return _int(spent) / limit


def _int(value: bytes | str) -> int:
    text = value.decode() if isinstance(value, bytes) else value
    return int(text) if text else 0
