"""Stripe through the official ``stripe`` SDK: Billing Meter Events, with retries.

:class:`StripeMeter` is the one place that talks to Stripe. It sends meter events one at
a time (``v1.billing.meter_events.create``) or in batches of up to 100 on the v2 meter
event stream (a ``meter_event_session``'s short-lived token, renewed before it expires
and on Stripe's ``temporary_session_expired`` answer), and reads the meters and their
event summaries for ``ai-saas billing reconcile``.

Retries are its own (the SDK's are switched off): 429, 409, 5xx and connection errors
are retried up to ``billing.stripe.maxRetries`` times with full-jitter exponential
backoff, never sooner than a ``Retry-After`` header asks. Every POST carries an
idempotency key derived from what it sends and the attempt number (the SDK's own is
random per call, so it cannot survive a crash). The attempt number is part of the key
because Stripe saves the first answer to a key, a 500 included, and replays it: a retry
under the same key after a 500 would get that 500 again. The meter event's
``identifier`` is what makes a re-send count once; a v1 re-send of an identifier Stripe
already holds is answered 400 "An event already exists with identifier ...", which
:meth:`StripeMeter.create` reports as a duplicate: delivered.

The API key is read from the environment variable ``billing.stripe.apiKeyEnv`` names and
never logged; the SDK logs nothing of it either (it logs URLs and form bodies only, at
``stripe``'s own logger's INFO/DEBUG).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, TypeVar

from ..config import StripeConfig
from ..errors import AISaaSError

__all__ = ["STREAM_BATCH", "MeterEvent", "StripeMeter", "StripeRefused", "StripeUnavailable"]

log = logging.getLogger("ai_saas_middleware.billing")

T = TypeVar("T")

STREAM_BATCH = 100  # meter events per v2 stream request: Stripe's maximum
_SESSION_MARGIN_S = 60.0  # a session token this close to its expiry is renewed first
_DUPLICATE = re.compile(r"already exists with identifier", re.IGNORECASE)


class StripeUnavailable(AISaaSError):
    """Stripe is not configured, cannot be reached, or refused the credentials (the
    message says which; it never contains the key)."""


class StripeRefused(AISaaSError):
    """Stripe refused a request for good (a 400 other than a duplicate identifier): sending
    it again cannot help. ``reason`` is Stripe's message."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class MeterEvent:
    """One meter event as Stripe takes it: whole units of usage for one customer."""

    identifier: str
    event_name: str
    customer: str
    value: int
    timestamp: int  # unix seconds

    def v1_params(self) -> dict[str, Any]:
        return {"event_name": self.event_name, "identifier": self.identifier,
                "timestamp": self.timestamp,
                "payload": {"stripe_customer_id": self.customer, "value": str(self.value)}}

    def v2_event(self) -> dict[str, Any]:
        stamp = datetime.fromtimestamp(self.timestamp, timezone.utc)
        return {"event_name": self.event_name, "identifier": self.identifier,
                "timestamp": stamp.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                "payload": {"stripe_customer_id": self.customer, "value": str(self.value)}}


def _sdk() -> Any:
    try:
        import stripe
    except ImportError:  # pragma: no cover - the billing extra brings it
        raise StripeUnavailable("billing.stripe needs the stripe SDK: pip install "
                                "'ai-saas-middleware[billing]'") from None
    return stripe


def _status(exc: Exception) -> int | None:
    status = getattr(exc, "http_status", None)
    return status if isinstance(status, int) else None


def _retry_after_s(exc: Exception) -> float:
    headers = getattr(exc, "headers", None) or {}
    value = None
    for name, text in dict(headers).items():
        if str(name).lower() == "retry-after":
            value = str(text)
    try:
        return max(0.0, min(float(value), 600.0)) if value is not None else 0.0
    except ValueError:  # an HTTP date: rare from Stripe; fall back to our own backoff
        return 0.0


def _message(exc: Exception) -> str:
    text = getattr(exc, "user_message", None) or str(exc) or type(exc).__name__
    return f"{type(exc).__name__} ({_status(exc) or 'no status'}): {text}"[:500]


class StripeMeter:
    """Meter events to Stripe, per ``billing.stripe`` (see the module docstring).

    ``sleep``, ``clock`` and ``rng`` are the backoff's wait, time and jitter (tests pass
    their own to see the delays without waiting them); ``backoff_s`` is the first retry's
    mean delay. :attr:`deadline` (an instant on ``clock``), when set, ends retrying
    early: a retry whose backoff would end past it is not made.
    Raises :class:`StripeUnavailable` when the API key's environment variable is unset.
    """

    def __init__(self, config: StripeConfig, *, backoff_s: float = 0.25,
                 backoff_cap_s: float = 20.0, timeout_s: float = 10.0,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random):
        stripe = _sdk()
        key = os.environ.get(config.api_key_env, "")
        if not key:
            raise StripeUnavailable(f"billing.stripe.apiKeyEnv: the environment variable "
                                    f"{config.api_key_env} (Stripe's API key) is not set")
        self.config = config
        self.backoff_s = backoff_s
        self.backoff_cap_s = backoff_cap_s
        self._sleep = sleep
        self.clock = clock
        self._rng = rng
        bases: dict[str, str] = {}
        if config.api_base:
            bases["api"] = config.api_base.rstrip("/")
        if config.meter_events_base:
            bases["meter_events"] = config.meter_events_base.rstrip("/")
        self._stripe = stripe
        self._client = stripe.StripeClient(
            key, base_addresses=bases, max_network_retries=0,
            http_client=stripe.RequestsClient(timeout=timeout_s))
        self.deadline: float | None = None  # on `clock`: no retry sleeps past it
        self._session_token: str | None = None
        self._session_expires = 0.0  # unix seconds
        self.sessions_created = 0

    # -- retries

    def _transient(self, exc: Exception) -> bool:
        s = self._stripe
        if isinstance(exc, (s.RateLimitError, s.APIConnectionError)):
            return True
        status = _status(exc)
        return isinstance(exc, s.StripeError) and status is not None and (
            status >= 500 or status in (409, 429))

    def _delay(self, attempt: int, exc: Exception) -> float:
        # Full jitter over a doubling ceiling (mean backoff_s * 2**attempt), capped.
        ceiling: float = min(self.backoff_cap_s, self.backoff_s * 2.0 ** attempt * 2)
        return max(_retry_after_s(exc), ceiling * float(self._rng()))

    def _with_retries(self, what: str, call: Callable[[int], T]) -> T:
        """``call(attempt)`` until it returns, retrying transient failures (see the module
        docstring); raises :class:`StripeUnavailable` once retries are spent or on an
        authentication error, :class:`StripeRefused` on a permanent refusal."""
        s = self._stripe
        attempt = 0
        while True:
            try:
                return call(attempt)
            except s.TemporarySessionExpiredError:
                # Not a failure of Stripe: our token aged out. Renew and go again now.
                self._session_token = None
                log.info("stripe: the meter event session expired; renewing it")
                if attempt >= self.config.max_retries:
                    raise StripeUnavailable(f"{what}: the meter event session kept "
                                            "expiring") from None
            except (s.AuthenticationError, s.PermissionError) as exc:
                raise StripeUnavailable(f"{what}: Stripe refused the API key from "
                                        f"${self.config.api_key_env}: {_message(exc)}"
                                        ) from None
            except s.StripeError as exc:
                if not self._transient(exc):
                    raise StripeRefused(_message(exc)) from None
                delay = self._delay(attempt, exc)
                late = self.deadline is not None and self.clock() + delay > self.deadline
                if attempt >= self.config.max_retries or late:
                    raise StripeUnavailable(f"{what}: gave up after {attempt + 1} attempts: "
                                            f"{_message(exc)}") from None
                log.warning("stripe: %s: %s; retrying in %.2fs (attempt %d of %d)", what,
                            _message(exc), delay, attempt + 2, self.config.max_retries + 1)
                self._sleep(delay)
            attempt += 1

    # -- v1: one meter event per request

    def create(self, event: MeterEvent, attempts_before: int = 0) -> tuple[bool, int]:
        """Send ``event``; (``True`` when Stripe already had its identifier, the attempts
        made). ``attempts_before`` (the ledger's count) keeps idempotency keys of a
        re-run from meeting a saved 500. Raises :class:`StripeRefused` or
        :class:`StripeUnavailable`."""
        made = 0

        def attempt(n: int) -> bool:
            nonlocal made
            made = n + 1
            key = f"{event.identifier}:{attempts_before + n}"
            try:
                self._client.v1.billing.meter_events.create(
                    event.v1_params(), {"idempotency_key": key})
            except self._stripe.InvalidRequestError as exc:
                if _status(exc) == 400 and _DUPLICATE.search(str(exc.user_message or "")):
                    return True
                raise
            return False

        duplicate = self._with_retries(f"meter event {event.identifier}", attempt)
        return duplicate, made

    # -- v2: the meter event stream

    def _session(self) -> str:
        if self._session_token is None or time.time() >= (self._session_expires
                                                          - _SESSION_MARGIN_S):
            session = self._client.v2.billing.meter_event_session.create()
            self.sessions_created += 1
            self._session_token = str(session.authentication_token)
            try:
                expires = datetime.fromisoformat(str(session.expires_at).replace("Z", "+00:00"))
                self._session_expires = expires.timestamp()
            except ValueError:  # unreadable: trust it for the documented 15 minutes
                self._session_expires = time.time() + 900
        return self._session_token

    def stream(self, events: Sequence[MeterEvent], attempts_before: int = 0
               ) -> Iterable[tuple[list[MeterEvent], int]]:
        """Send ``events`` on the v2 meter event stream in batches of up to 100, yielding
        each batch once Stripe took it, with the attempts it took (record it before
        asking for the next). Stripe deduplicates a re-sent identifier silently here.
        Raises :class:`StripeRefused` or :class:`StripeUnavailable` for the batch that
        failed (the ones yielded before are delivered)."""
        for start in range(0, len(events), STREAM_BATCH):
            batch = list(events[start:start + STREAM_BATCH])
            digest = hashlib.sha256("\n".join(e.identifier for e in batch).encode()
                                    ).hexdigest()[:48]
            made = 0

            def attempt(n: int, batch: list[MeterEvent] = batch, digest: str = digest) -> None:
                nonlocal made
                made = n + 1
                token = self._session()
                self._client.v2.billing.meter_event_stream.create(
                    {"events": [e.v2_event() for e in batch]},
                    {"api_key": token, "idempotency_key": f"{digest}:{attempts_before + n}"})

            self._with_retries(f"meter event stream batch of {len(batch)}", attempt)
            yield batch, made

    # -- reading back

    def meter_id(self) -> str:
        """The meter to reconcile with: ``billing.stripe.meterId``, else the active meter
        whose ``event_name`` is ``billing.stripe.eventName``."""
        if self.config.meter_id:
            return self.config.meter_id

        def find(_n: int) -> str | None:
            meters = self._client.v1.billing.meters.list({"limit": 100})
            for meter in meters.auto_paging_iter():
                if (getattr(meter, "event_name", None) == self.config.event_name
                        and getattr(meter, "status", "active") == "active"):
                    return str(meter.id)
            return None

        found = self._with_retries("listing the meters", find)
        if found is None:
            raise StripeUnavailable(f"Stripe has no active meter with event_name "
                                    f"{self.config.event_name!r} (billing.stripe.eventName); "
                                    "create it, or name it in billing.stripe.meterId")
        return found

    def summary(self, meter_id: str, customer: str, start: int, end: int) -> Decimal:
        """Stripe's aggregated value of ``meter_id`` for ``customer`` in [start, end)."""

        def read(_n: int) -> Decimal:
            page = self._client.v1.billing.meters.event_summaries.list(
                meter_id, {"customer": customer, "start_time": start, "end_time": end,
                           "limit": 100})
            total = sum((Decimal(str(s.aggregated_value)) for s in page.auto_paging_iter()),
                        Decimal(0))
            # Stripe answers a JSON number (58.0): whole units read back as 58.
            return total.to_integral_value() if total == total.to_integral_value() else total

        return self._with_retries(f"the event summaries of {customer}", read)
