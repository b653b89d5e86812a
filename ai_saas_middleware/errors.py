"""The exception tree of ai_saas_middleware.

::

    AISaaSError
    ├── ConfigError            the configuration is wrong; lists every problem with its path
    ├── StoreError             Redis could not be reached or answered unexpectedly
    │   └── StoreRefused       Redis answered but refused the command (retrying won't help)
    ├── UnknownTenant          no tenant with that id (or credentials match no tenant)
    ├── LimitExceeded          a tier limit refused the request (status 429)
    │   ├── RateLimited        requests per minute
    │   ├── QuotaExceeded      monthly tokens
    │   └── BudgetExceeded     a money budget (monthly or daily)
    ├── NoEligibleModel        no allowed model meets the request's requirements (422)
    │   └── NoHealthyModel     every eligible model failed or has an open breaker (503)
    └── RequestRefused         any other refusal of ``Gateway.request()`` (carries the Decision)

Web adapters never raise these to the client: a refusal becomes a JSON error response
(see :mod:`ai_saas_middleware.responses`). They are raised where there is no HTTP
response to write, e.g. by ``gateway.request(...)`` in a background job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "AISaaSError",
    "BudgetExceeded",
    "ConfigError",
    "ConfigProblem",
    "LimitExceeded",
    "NoEligibleModel",
    "NoHealthyModel",
    "QuotaExceeded",
    "RateLimited",
    "Refusal",
    "RequestRefused",
    "StoreError",
    "StoreRefused",
    "UnknownTenant",
]


class AISaaSError(Exception):
    """Base class of every error this package raises."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in a configuration: where, what was expected, what was found."""

    path: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.path}: expected {self.expected}, found {self.found}"


class ConfigError(AISaaSError):
    """The configuration is invalid. ``problems`` lists every problem at once."""

    def __init__(self, problems: list[ConfigProblem] | tuple[ConfigProblem, ...], source: str = ""):
        self.problems = tuple(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"{count} configuration {noun}{where}:\n{lines}")


class StoreError(AISaaSError):
    """Redis was unreachable, timed out, or answered something unexpected."""


class StoreRefused(StoreError):
    """Redis answered, but refused the command (a script error, a key of the wrong type)."""


class UnknownTenant(AISaaSError):
    """No tenant with that id exists (in the config or in Redis)."""


class Refusal(Protocol):
    """What a refusal's exception holds of it: a refused
    :class:`~ai_saas_middleware.types.Decision` is one. (A protocol, so that the exception
    tree, which config.py needs, does not import the request types.)"""

    @property
    def allowed(self) -> bool: ...
    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def body(self) -> bytes: ...
    @property
    def error_code(self) -> str | None: ...
    @property
    def error_message(self) -> str | None: ...
    @property
    def retry_after_s(self) -> int | None: ...


class RequestRefused(AISaaSError):
    """The gateway refused a request; ``decision`` (the refused
    :class:`~ai_saas_middleware.types.Decision`) holds status, code and message."""

    def __init__(self, decision: Refusal):
        self.decision = decision
        super().__init__(f"{decision.status} {decision.error_code}: {decision.error_message}")


class LimitExceeded(RequestRefused):
    """A tier limit refused the request; ``retry_after_s`` says when to try again."""

    @property
    def retry_after_s(self) -> int:
        return self.decision.retry_after_s or 0


class RateLimited(LimitExceeded):
    """The tier's requests-per-minute limit is reached."""


class QuotaExceeded(LimitExceeded):
    """The tier's monthly token quota is used up (or too small for this request)."""


class BudgetExceeded(LimitExceeded):
    """A money budget (the tenant's or its tier's, monthly or daily) cannot hold the
    request's worst-case cost."""


class NoEligibleModel(RequestRefused):
    """No allowed model meets the request's requirements (or all are unhealthy)."""


class NoHealthyModel(NoEligibleModel):
    """Every eligible model failed or has an open circuit breaker (503 with Retry-After).

    Raised by ``ctx.execute``/``ctx.complete`` when the fallback chain is exhausted; a web
    adapter that sees it leave the handler renders its ``decision`` (the 503, or the
    configured ``routing.defaultResponse``), never a 500."""
