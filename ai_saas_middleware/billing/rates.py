"""What a tenant is charged for one event: ``billing.pricingRules``, ``markup``, minimum.

Exact integer arithmetic in picodollars: a rate has at most 12 decimal places (the
loader checks), so ``rate x units`` is a whole number of picodollars with no rounding;
a markup rounds the product up to the next whole picodollar. No decimal context is used.

How an event is priced (a :class:`Plan`):

1. **Usage rates.** For each metric (``input_tokens``, ``output_tokens``, ``requests``) the
   rule naming the event's tier applies, else the rule naming no tier. When some rule
   applies, the price is the sum of ``rate x units``.
2. **Cost-plus.** When no rule applies and ``markup`` is set: ``cost x (1 + markup)``.
3. **Nothing.** Otherwise 0 (the ledger still records the cost).
4. **Minimum.** ``minimumPerRequest``, when set, is the least any request is charged.

Every plan has a version (``pricing_versions`` in the ledger, keyed by the digest of
:meth:`Plan.canonical`), which each ledger row records.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from decimal import Decimal

from ..budgets import PICODOLLARS, to_picodollars
from ..config import BillingConfig, MarginRule, PricingRule
from ..pricing import format_usd
from .events import Event

__all__ = ["Plan", "Pricing"]


@dataclass(frozen=True, slots=True)
class Plan:
    """One way of pricing events: rates (picodollars per unit), markup, minimum."""

    rules: tuple[PricingRule, ...]
    markup_p: int | None  # markup x 10^12
    minimum_p: int

    @classmethod
    def of(cls, rules: tuple[PricingRule, ...], markup: Decimal | None,
           minimum: Decimal | None) -> Plan:
        return cls(rules, None if markup is None else to_picodollars(markup),
                   0 if minimum is None else to_picodollars(minimum))

    def canonical(self) -> str:
        """The plan as canonical JSON (what its version's digest is taken of)."""
        return json.dumps({
            "rules": [{"metric": r.metric, "rate": format_usd(r.rate), "tier": r.tier}
                      for r in self.rules],
            "markup": None if self.markup_p is None else str(self.markup_p),
            "minimum_p": str(self.minimum_p),
        }, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()

    def rates_for(self, tier: str) -> dict[str, int]:
        """Picodollars per unit, per metric, for events of ``tier``."""
        rates: dict[str, int] = {}
        for rule in self.rules:  # tierless first, then the tier's own override them
            if rule.tier is None:
                rates[rule.metric] = to_picodollars(rule.rate)
        for rule in self.rules:
            if rule.tier == tier:
                rates[rule.metric] = to_picodollars(rule.rate)
        return rates

    def price(self, event: Event, rates: dict[str, int]) -> int:
        """What ``event`` is charged, in picodollars (``rates``: :meth:`rates_for`)."""
        if rates:
            revenue = (rates.get("input_tokens", 0) * event.prompt_tokens
                       + rates.get("output_tokens", 0) * event.completion_tokens
                       + rates.get("requests", 0))
        elif self.markup_p is not None:
            scaled = event.cost_p * (PICODOLLARS + self.markup_p)
            revenue = -(-scaled // PICODOLLARS)  # rounded up
        else:
            revenue = 0
        return max(revenue, self.minimum_p)


class Pricing:
    """The deployment's plans: the base one and one per ``billing.marginRules`` entry that
    switches pricing. :meth:`price` fills an event's ``revenue_p`` and ``pricing_version``
    (the versions come from the ledger: :meth:`bind`)."""

    def __init__(self, billing: BillingConfig):
        self.base = Plan.of(billing.pricing_rules, billing.markup, billing.minimum_per_request)
        self.margin_rules: tuple[MarginRule, ...] = billing.margin_rules
        self.switched: dict[int, Plan] = {}
        for i, rule in enumerate(billing.margin_rules):
            if rule.markup is not None or rule.pricing_rules:
                self.switched[i] = Plan.of(rule.pricing_rules, rule.markup,
                                           billing.minimum_per_request)
        self.versions: dict[Plan, int] = {}
        self._priced: dict[tuple[int | None, str], tuple[Plan, dict[str, int], int]] = {}

    def plans(self) -> list[Plan]:
        return [self.base, *self.switched.values()]

    def bind(self, versions: dict[Plan, int]) -> None:
        """Take each plan's version (registered in the ledger)."""
        self.versions = dict(versions)
        self._priced.clear()

    def plan_of(self, switched_rule: int | None) -> Plan:
        if switched_rule is not None and switched_rule in self.switched:
            return self.switched[switched_rule]
        return self.base

    def price(self, event: Event, switched_rule: int | None = None) -> None:
        # Keyed by the rule's index, not the Plan: hashing a Plan hashes all its rules and
        # their Decimals, once per event.
        key = (switched_rule if switched_rule in self.switched else None, event.tier)
        found = self._priced.get(key)
        if found is None:
            plan = self.plan_of(switched_rule)
            found = self._priced[key] = (plan, plan.rates_for(event.tier),
                                         self.versions.get(plan, 0))
        plan, rates, version = found
        event.revenue_p = plan.price(event, rates)
        event.pricing_version = version
