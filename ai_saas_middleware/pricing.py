"""Exact money from usage and prices. Pure; no I/O; never a float."""

from __future__ import annotations

from decimal import Decimal

from .config import ModelProfile

__all__ = ["cost_of", "expected_cost", "format_usd"]


def cost_of(model: ModelProfile, prompt_tokens: int, completion_tokens: int) -> Decimal:
    """What ``prompt_tokens`` in and ``completion_tokens`` out cost on ``model``, in USD."""
    return (model.cost_per_input_token * prompt_tokens
            + model.cost_per_output_token * completion_tokens)


def expected_cost(model: ModelProfile, prompt_tokens: int, max_output_tokens: int) -> Decimal:
    """The most a request can cost on ``model``: its prompt and every output token allowed."""
    return cost_of(model, prompt_tokens, max_output_tokens)


def format_usd(amount: Decimal) -> str:
    """A plain decimal string (no exponent), as the usage stream carries money: '0.0000123'."""
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"
