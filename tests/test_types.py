"""The hot path's quick constructors of Decision and Outcome build the very objects the
dataclasses' own constructors build: equal, of equal hash, and frozen."""

from __future__ import annotations

import dataclasses

import pytest

from ai_saas_middleware.types import Decision, Outcome, allowed_decision, new_outcome


def test_allowed_decision_is_the_decision_its_constructor_builds() -> None:
    headers = (("x-request-id", "req_1"), ("x-ai-model", "m"))
    context, ticket = object(), object()  # compared by identity, as the real ones are
    quick = allowed_decision(headers, context, ticket)  # type: ignore[arg-type]
    built = Decision(True, 200, headers, context=context, ticket=ticket)  # type: ignore[arg-type]

    assert quick == built and hash(quick) == hash(built) and type(quick) is Decision
    assert all(getattr(quick, f.name) is getattr(built, f.name)
               for f in dataclasses.fields(Decision))
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick.status = 500  # type: ignore[misc]


@pytest.mark.parametrize("args", [(200, (3, 4), 12, False, False), (500, None, 0, True, True)])
def test_new_outcome_is_the_outcome_its_constructor_builds(
        args: tuple[int, tuple[int, int] | None, int, bool, bool]) -> None:
    quick = new_outcome(*args)

    assert quick == Outcome(*args) and hash(quick) == hash(Outcome(*args))
    assert repr(quick) == repr(Outcome(*args))
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick.failed = True  # type: ignore[misc]
