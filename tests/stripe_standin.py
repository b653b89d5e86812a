"""A stand-in for Stripe's Billing Meter APIs: real HTTP on loopback, with state.

Endpoints (what :mod:`ai_saas_middleware.billing.stripe_client` uses, answered as Stripe
answers them; wire format from the stripe SDK's source and Stripe's API reference):

=========================================  ==============================================
``POST /v1/billing/meter_events``          form-encoded; stores the event once per
                                           ``identifier``; a known identifier gets 400
                                           ``invalid_request_error`` "An event already
                                           exists with identifier ...".
``GET /v1/billing/meters``                 the meters (a list object)
``GET /v1/billing/meters/{id}/event_summaries``  one summary: the sum of the customer's
                                           values with ``start_time <= ts < end_time``
``POST /v2/billing/meter_event_session``   a session token valid ``session_lifetime_s``
``POST /v2/billing/meter_event_stream``    JSON, up to 100 events, authorized by a session
                                           token; re-sent identifiers are dropped silently
                                           (v2 validates asynchronously); an expired
                                           token gets 401 ``temporary_session_expired``
=========================================  ==============================================

Idempotency keys behave as Stripe's: the first answer to a key that reached the endpoint
(200, a 400 duplicate, a 500 after commit) is saved and replayed to a request with the
same key; a 429 saves nothing.

Programmable faults: :attr:`StripeStandIn.rate_limit_burst` (the next N meter event
requests get 429, with :attr:`retry_after` as ``Retry-After``),
:attr:`StripeStandIn.fail_after_commit` (the next N store their events, then answer 500),
:meth:`StripeStandIn.expire_sessions` (every session token issued so far expires now),
:attr:`StripeStandIn.refuse_customers` (400 "No such customer"),
:attr:`StripeStandIn.hold` (after storing, a v1 event waits until released: a test kills
the sender meanwhile).

Every request's shape is checked (the bearer key or session token, ``Stripe-Version``,
``Idempotency-Key`` on POST, content types, the body's fields and their formats); what
does not match Stripe's contract goes to :attr:`StripeStandIn.violations`, which the
tests assert is empty.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

API_KEY = "sk_test_standin_4eC39HqLyjWDarjtT1zdp7dc"
_V1_FIELDS = {"event_name", "identifier", "timestamp", "payload[stripe_customer_id]",
              "payload[value]"}
_WHOLE = re.compile(r"\A\d{1,18}\Z")
_ISO = re.compile(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z\Z")


@dataclass
class Stored:
    """One meter event Stripe holds."""

    identifier: str
    event_name: str
    customer: str
    value: Decimal
    timestamp: int
    via: str  # v1 | v2


@dataclass
class StripeStandIn:
    """The server's state; :func:`start` runs it. Every field is read and set under
    :attr:`lock` by the handler; tests read them after the deliverer returned."""

    event_names: tuple[str, ...] = ("ai_usage",)
    session_lifetime_s: float = 900.0
    rate_limit_burst: int = 0
    retry_after: str | None = "0"
    fail_after_commit: int = 0
    refuse_customers: set[str] = field(default_factory=set)  # 400 "No such customer"
    latency_s: float = 0.0  # a slow Stripe: every POST is answered this much later
    hold: threading.Event | None = None  # set: v1 events wait after storing until released
    held: threading.Event = field(default_factory=threading.Event)  # one is being held
    events: dict[str, Stored] = field(default_factory=dict)
    received: Counter[str] = field(default_factory=Counter)  # identifier -> requests
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    violations: list[str] = field(default_factory=list)
    cut_short: int = 0  # requests whose body never arrived whole (dropped, unanswered)
    sessions: dict[str, float] = field(default_factory=dict)  # token -> expires (unix s)
    stream_calls: int = 0
    expire_after_calls: int | None = None  # sessions expire after this many stream calls
    expired_answers: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    _idempotent: dict[str, tuple[str, int, dict[str, Any]]] = field(default_factory=dict)
    url: str = ""

    def meters(self) -> list[dict[str, Any]]:
        return [{"id": f"mtr_standin_{i}", "object": "billing.meter", "event_name": name,
                 "status": "active", "display_name": name,
                 "default_aggregation": {"formula": "sum"},
                 "customer_mapping": {"event_payload_key": "stripe_customer_id",
                                      "type": "by_id"},
                 "value_settings": {"event_payload_key": "value"}, "livemode": False}
                for i, name in enumerate(self.event_names)]

    def totals(self) -> dict[str, Decimal]:
        """Customer -> the sum of the values Stripe holds."""
        out: dict[str, Decimal] = {}
        with self.lock:
            for ev in self.events.values():
                out[ev.customer] = out.get(ev.customer, Decimal(0)) + ev.value
        return out

    def expire_sessions(self) -> None:
        with self.lock:
            for token in self.sessions:
                self.sessions[token] = 0.0

    def plant(self, customer: str, value: int, timestamp: int, identifier: str = "") -> None:
        """An event Stripe holds that no delivery of ours sent (a reconcile test)."""
        ident = identifier or "planted-" + uuid.uuid4().hex
        with self.lock:
            self.events[ident] = Stored(ident, self.event_names[0], customer,
                                        Decimal(value), timestamp, "planted")


def _error(status: int, etype: str, message: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"type": etype, "message": message, **extra}}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def state(self) -> StripeStandIn:
        return self.server.state

    def _violation(self, text: str) -> None:
        with self.state.lock:
            self.state.violations.append(f"{self.command} {self.path}: {text}")

    def _answer(self, status: int, body: dict[str, Any],
                headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Request-Id", "req_" + uuid.uuid4().hex[:14])
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:  # the client was killed while its answer was held back
            self.close_connection = True

    def _common(self, token_kind: str) -> str:
        """Check the headers every request carries; the bearer credential."""
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            self._violation(f"no bearer credential (Authorization {auth[:12]!r}...)")
        credential = auth[7:]
        if token_kind == "key" and credential != API_KEY:
            shown = credential[:8] + "*" * max(0, len(credential) - 12) + credential[-4:]
            self._answer(*_error(401, "invalid_request_error",
                                 f"Invalid API Key provided: {shown}"))
            return ""
        if not self.headers.get("Stripe-Version"):
            self._violation("no Stripe-Version header")
        if self.command == "POST" and not self.headers.get("Idempotency-Key"):
            self._violation("no Idempotency-Key header")
        return credential

    # -- dispatch

    def do_GET(self) -> None:
        with self.state.lock:
            self.state.requests.append(("GET", self.path))
        if not self._common("key"):
            return
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == "/v1/billing/meters":
            data = self.state.meters()
            self._answer(200, {"object": "list", "data": data, "has_more": False,
                               "url": "/v1/billing/meters"})
            return
        m = re.fullmatch(r"/v1/billing/meters/([^/]+)/event_summaries", parts.path)
        if m:
            self._summaries(m.group(1), query)
            return
        self._answer(*_error(404, "invalid_request_error", f"Unrecognized request URL "
                                                           f"(GET: {parts.path})"))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        path = urlsplit(self.path).path
        if len(raw) < length:
            # The client went away mid-body (a worker SIGKILLed while it sent): Stripe
            # never sees a request it did not receive whole, so neither does this one.
            with self.state.lock:
                self.state.cut_short += 1
            self.close_connection = True
            return
        with self.state.lock:
            self.state.requests.append(("POST", path))
            latency = self.state.latency_s
        if latency:
            time.sleep(latency)
        if path == "/v1/billing/meter_events":
            if self._common("key"):
                self._v1_event(raw)
        elif path == "/v2/billing/meter_event_session":
            if self._common("key"):
                self._v2_session(raw)
        elif path == "/v2/billing/meter_event_stream":
            token = self._common("session")
            self._v2_stream(token, raw)
        else:
            self._answer(*_error(404, "invalid_request_error",
                                 f"Unrecognized request URL (POST: {path})"))

    # -- faults and idempotency

    def _rate_limited(self) -> bool:
        s = self.state
        with s.lock:
            if s.rate_limit_burst <= 0:
                return False
            s.rate_limit_burst -= 1
        headers = {"Retry-After": s.retry_after} if s.retry_after is not None else {}
        self._answer(*_error(429, "rate_limit_error" if "v1" in self.path else "rate_limit",
                             "Too many requests hit the API too quickly."), headers)
        return True

    def _replayed(self, key: str, fingerprint: str) -> bool:
        with self.state.lock:
            saved = self.state._idempotent.get(key)
        if saved is None:
            return False
        if saved[0] != fingerprint:
            self._answer(*_error(400, "idempotency_error",
                                 "Keys for idempotent requests can only be used with the "
                                 "same parameters they were first used with."))
            return True
        self._answer(saved[1], saved[2], {"Idempotent-Replayed": "true"})
        return True

    def _admitted(self, raw: bytes) -> tuple[str, str] | None:
        """(idempotency key, request fingerprint) of a write Stripe goes on to process,
        or None when it was answered already: rate limited, or an idempotent replay."""
        if self._rate_limited():
            return None
        key = self.headers.get("Idempotency-Key", "")
        fingerprint = raw.decode()
        if key and self._replayed(key, fingerprint):
            return None
        return key, fingerprint

    def _finish(self, key: str, fingerprint: str, status: int, body: dict[str, Any],
                committed: bool) -> None:
        s = self.state
        with s.lock:
            failing = committed and s.fail_after_commit > 0
            if failing:
                s.fail_after_commit -= 1
                status, body = _error(500, "api_error", "An unknown error occurred")
            if key:
                s._idempotent[key] = (fingerprint, status, body)
        self._answer(status, body)

    # -- v1

    def _v1_event(self, raw: bytes) -> None:
        if self.headers.get("Content-Type", "") != "application/x-www-form-urlencoded":
            self._violation(f"v1 body is {self.headers.get('Content-Type')!r}, not form")
        form = {k: v for k, v in parse_qs(raw.decode(), keep_blank_values=True).items()}
        if any(len(v) != 1 for v in form.values()):
            self._violation("a form field given twice")
        fields = {k: v[0] for k, v in form.items()}
        if set(fields) != _V1_FIELDS:
            self._violation(f"v1 fields {sorted(fields)}, expected {sorted(_V1_FIELDS)}")
        ident = fields.get("identifier", "")
        value = fields.get("payload[value]", "")
        stamp = fields.get("timestamp", "")
        name = fields.get("event_name", "")
        if not 1 <= len(ident) <= 100:
            self._violation(f"identifier of {len(ident)} characters")
        if not _WHOLE.match(value):
            self._violation(f"payload[value] {value!r} is not a whole number")
        if not _WHOLE.match(stamp):
            self._violation(f"timestamp {stamp!r} is not unix seconds")
        if name not in self.state.event_names:
            self._violation(f"event_name {name!r} has no meter")
        if not fields.get("payload[stripe_customer_id]", "").startswith("cus_"):
            self._violation("payload[stripe_customer_id] is not a customer id")
        gate = self._admitted(raw)
        if gate is None:
            return
        key, fingerprint = gate
        s = self.state
        customer = fields.get("payload[stripe_customer_id]", "")
        if customer in s.refuse_customers:
            status, body = _error(400, "invalid_request_error",
                                  f"No such customer: '{customer}'",
                                  param="payload[stripe_customer_id]",
                                  code="resource_missing")
            self._finish(key, fingerprint, status, body, committed=False)
            return
        with s.lock:
            s.received[ident] += 1
            known = ident in s.events
            if not known and _WHOLE.match(value) and _WHOLE.match(stamp):
                s.events[ident] = Stored(ident, name, fields["payload[stripe_customer_id]"],
                                         Decimal(value), int(stamp), "v1")
        if known:
            status, body = _error(400, "invalid_request_error",
                                  f"An event already exists with identifier {ident}.",
                                  param="identifier")
            self._finish(key, fingerprint, status, body, committed=False)
            return
        if s.hold is not None:
            s.held.set()
            s.hold.wait(30)
        self._finish(key, fingerprint, 200, {
            "object": "billing.meter_event", "created": int(time.time()), "event_name": name,
            "identifier": ident, "livemode": False, "timestamp": int(stamp or 0),
            "payload": {"stripe_customer_id": fields.get("payload[stripe_customer_id]"),
                        "value": value}}, committed=True)

    def _summaries(self, meter_id: str, query: dict[str, str]) -> None:
        meter = next((m for m in self.state.meters() if m["id"] == meter_id), None)
        if meter is None:
            self._answer(*_error(404, "invalid_request_error",
                                 f"No such billing meter: '{meter_id}'"))
            return
        for name in ("customer", "start_time", "end_time"):
            if name not in query:
                self._violation(f"event_summaries without {name}")
        try:
            start, end = int(query.get("start_time", 0)), int(query.get("end_time", 0))
        except ValueError:
            self._violation("start_time/end_time are not unix seconds")
            start = end = 0
        if start % 60 or end % 60:
            self._violation("start_time/end_time not aligned with minute boundaries")
        customer = query.get("customer", "")
        with self.state.lock:
            total = sum((e.value for e in self.state.events.values()
                         if e.customer == customer and e.event_name == meter["event_name"]
                         and start <= e.timestamp < end), Decimal(0))
        self._answer(200, {"object": "list", "has_more": False,
                           "url": f"/v1/billing/meters/{meter_id}/event_summaries",
                           "data": [{"id": "mtrusg_" + uuid.uuid4().hex[:14],
                                     "object": "billing.meter_event_summary",
                                     "aggregated_value": float(total), "start_time": start,
                                     "end_time": end, "livemode": False,
                                     "meter": meter_id}]})

    # -- v2

    def _v2_json(self, raw: bytes) -> Any:
        if self.headers.get("Content-Type", "") != "application/json":
            self._violation(f"v2 body is {self.headers.get('Content-Type')!r}, not JSON")
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            self._violation("v2 body is not JSON")
            return {}

    def _v2_session(self, raw: bytes) -> None:
        self._v2_json(raw)
        token = "mes_token_" + uuid.uuid4().hex
        now = time.time()
        s = self.state
        with s.lock:
            s.sessions[token] = now + s.session_lifetime_s
            lifetime = s.session_lifetime_s
        def iso(x: float) -> str:
            return datetime.fromtimestamp(x, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        self._answer(200, {"object": "v2.billing.meter_event_session",
                           "id": "mes_" + uuid.uuid4().hex[:20], "authentication_token": token,
                           "created": iso(now), "expires_at": iso(now + lifetime),
                           "livemode": False})

    def _v2_stream(self, token: str, raw: bytes) -> None:
        body = self._v2_json(raw)
        s = self.state
        with s.lock:
            s.stream_calls += 1
            expires = s.sessions.get(token)
        if expires is None:
            self._violation("stream call authorized by something not a session token")
            self._answer(*_error(401, "authentication_error", "Invalid token"))
            return
        with s.lock:
            if s.expire_after_calls is not None and s.stream_calls > s.expire_after_calls:
                s.expire_after_calls = None
                for issued in s.sessions:
                    s.sessions[issued] = 0.0
                expires = 0.0
        if time.time() >= expires:
            with s.lock:
                s.expired_answers += 1
            self._answer(*_error(401, "temporary_session_expired",
                                 "The meter event session has expired. Create a new one.",
                                 code="billing_meter_event_session_expired"))
            return
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not 1 <= len(events) <= 100:
            self._violation("stream body without 1 to 100 events")
            events = []
        if set(body) != {"events"}:
            self._violation(f"stream body keys {sorted(body)}")
        gate = self._admitted(raw)
        if gate is None:
            return
        key, fingerprint = gate
        for ev in events:
            self._v2_store(ev)
        self._finish(key, fingerprint, 200, {}, committed=True)

    def _v2_store(self, ev: Any) -> None:
        if not isinstance(ev, dict) or set(ev) != {"event_name", "identifier", "payload",
                                                  "timestamp"}:
            self._violation(f"stream event fields {sorted(ev) if isinstance(ev, dict) else ev}")
            return
        payload = ev.get("payload") or {}
        value = payload.get("value")
        if set(payload) != {"stripe_customer_id", "value"} or not isinstance(value, str) \
                or not _WHOLE.match(value):
            self._violation(f"stream payload {payload}")
            return
        stamp = ev.get("timestamp")
        if not isinstance(stamp, str) or not _ISO.match(stamp):
            self._violation(f"stream timestamp {stamp!r} is not ISO-8601 UTC")
            return
        if ev["event_name"] not in self.state.event_names:
            self._violation(f"event_name {ev['event_name']!r} has no meter")
        ident = str(ev["identifier"])
        if not 1 <= len(ident) <= 100:
            self._violation(f"identifier of {len(ident)} characters")
        unix = int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
        s = self.state
        with s.lock:
            s.received[ident] += 1
            if ident not in s.events:
                s.events[ident] = Stored(ident, ev["event_name"], payload["stripe_customer_id"],
                                         Decimal(value), unix, "v2")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: StripeStandIn):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


@dataclass
class Running:
    """A running stand-in: :attr:`state` and :attr:`url`; :meth:`close` stops it."""

    state: StripeStandIn
    server: _Server
    thread: threading.Thread

    @property
    def url(self) -> str:
        return self.state.url

    def close(self) -> None:
        if self.state.hold is not None:
            self.state.hold.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def start(state: StripeStandIn | None = None) -> Running:
    """Serve ``state`` (a fresh one by default) on a loopback port, in a thread."""
    state = state or StripeStandIn()
    server = _Server(state)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="stripe-standin", daemon=True)
    thread.start()
    return Running(state, server, thread)
