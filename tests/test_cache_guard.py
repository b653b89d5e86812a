"""The lexical trap guard: a near match whose numbers, dates, negation, names, scope or
units differ is vetoed; a paraphrase is let through."""

from __future__ import annotations

import pytest

from ai_saas_middleware.cache import LexicalGuard, Verifier

GUARD = LexicalGuard()


@pytest.mark.parametrize("cached, new, reason", [
    ("Track order 48213", "Track order 48231", "number"),
    ("How much is a 23kg checked bag?", "How much is a 32kg checked bag?", "number"),
    ("Book two tickets for the show", "Book three tickets for the show", "number"),
    ("Book 2 tickets for the show", "Book three tickets for the show", "number"),
    ("Table for four at 7pm please", "Table for four at 8pm please", "number"),
    ("What happened in 1066?", "What happened in 1666?", "number"),
    ("Is the shop open on Monday?", "Is the shop open on Tuesday?", "date"),
    ("Can I get a delivery in May?", "Can I get a delivery in June?", "date"),
    ("Can I get it delivered today?", "Can I get it delivered tomorrow?", "date"),
    ("Cancel my subscription", "Don't cancel my subscription", "negation"),
    ("What happens if I pay my bill on time?",
     "What happens if I don't pay my bill on time?", "negation"),
    ("Is ibuprofen safe to take with alcohol?",
     "Is ibuprofen unsafe to take with alcohol?", "negation"),
    ("Can I travel with a passport?", "Can I travel without a passport?", "negation"),
    ("Is the clinic open on Sundays?", "Is the clinic closed on Sundays?", "antonym"),
    ("How do I turn on two-factor authentication?",
     "How do I turn off two-factor authentication?", "antonym"),
    ("Who is the CEO of Microsoft?", "Who is the CEO of Apple?", "entity"),
    ("How do I install Python on Windows?", "How do I install Python on macOS?", "entity"),
    ("what's the capital of france", "What's the capital of Spain?", "entity"),
    ("Can I return all items?", "Can I return only sale items?", "scope"),
    ("Which plans include calls to every country?",
     "Which plans include calls to some countries?", "scope"),
    ("How much is the fee in £?", "How much is the fee in $?", "unit"),
    ("What is the price per month?", "What is the price per year?", "unit"),
])
def test_the_guard_vetoes_what_changes_the_answer(cached: str, new: str,
                                                  reason: str) -> None:
    assert GUARD.veto_reason(new, cached) == reason
    assert GUARD.veto_reason(cached, new) == reason  # symmetric
    assert not GUARD.accepts(new, cached)


@pytest.mark.parametrize("cached, new", [
    ("How do I change my password?", "How can I change my password?"),
    ("How do I switch energy supplier?", "How do I change energy supplier?"),
    ("Where is my order?", "Can you tell me where my parcel is?"),
    ("Do you do takeaway?", "Just wondering, do you do takeaway?"),
    ("What's the interest rate on a 2-year fixed mortgage?",
     "What rate do you offer on two-year fixes?"),
    ("Can I book a table for 6pm?", "can i book a table for 6 p.m."),
    ("How do I cancel my Netflix plan?", "netflix: how do I cancel my plan?"),
    ("What's the price for non-members?", "How much does it cost if I'm not a member?"),
    ("Where can I find my invoice history?", "Where can I find my invioce history?"),
    ("How do I get a refund?", "I'd like a refund, how do I get one?"),
    ("Who runs Microsoft?", "Who is the CEO of Microsoft?"),
])
def test_the_guard_lets_a_paraphrase_through(cached: str, new: str) -> None:
    assert GUARD.veto_reason(new, cached) is None
    assert GUARD.accepts(new, cached)


def test_a_number_written_out_equals_its_digits() -> None:
    assert GUARD.accepts("Book 2 tickets for the show", "Book two tickets for the show")
    assert GUARD.accepts("It costs 1,000 pounds", "It costs 1000 pounds")
    assert GUARD.accepts("Pay £2.50 now", "Pay £2.5 now")
    assert GUARD.accepts("twenty three people", "23 people")


def test_the_guard_is_a_verifier() -> None:
    assert isinstance(GUARD, Verifier)
