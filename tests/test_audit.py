"""``ai-saas billing audit``: the quota counters, the reservations, the spool, the streams and
the ledger side by side; it adds up after real traffic and catches what breaks the chain
(an event lost from a stream before the ledger had it, a counter counted twice).

Events reach the ledger here through :meth:`Ledger.record` and are then deleted from the
stream (what the worker's acknowledgement and trim do), so each test places every event
exactly where it wants it: only in a stream, in both, or only in the ledger. The worker
itself runs in ``tests/test_durable_path.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from conftest import API_KEYS
from starlette.testclient import TestClient
from starlette_app import make_starlette_app

from ai_saas_middleware import Gateway, RequestInfo, load_config
from ai_saas_middleware.billing.audit import TenantAudit, audit
from ai_saas_middleware.billing.events import parse_entry
from ai_saas_middleware.billing.ledger import Ledger
from ai_saas_middleware.billing.rates import Pricing
from ai_saas_middleware.cli import main
from ai_saas_middleware.store.keys import KeySchema
from ai_saas_middleware.store.redis import RedisStore
from ai_saas_middleware.types import Outcome

PERIOD = time.strftime("%Y-%m", time.gmtime())


def chat(client: TestClient, tenant: str, prompt: int, completion: int) -> str:
    reply = client.post("/ai/chat", headers={"Authorization": f"Bearer {API_KEYS[tenant]}"},
                        json={"messages": [{"role": "user", "content": "Hi"}],
                              "max_tokens": 64, "reply_usage": [prompt, completion]})
    assert reply.status_code == 200, reply.text
    return reply.headers["x-request-id"]


class Deployment:
    """A config on the test's Redis and prefix, a ledger, and the means to move events."""

    def __init__(self, config: dict[str, Any], rclient: redis.Redis, ledger_url: str,
                 tmp_path: Path):
        self.raw = config
        self.config = load_config(config)
        self.rclient = rclient
        self.ledger_url = ledger_url
        self.ledger = Ledger(ledger_url)
        self.ledger.migrate()
        self.pricing = Pricing(self.config.billing)
        self.ledger.register(self.pricing)
        self.keys = KeySchema(self.config.redis.key_prefix, self.config.redis.shards)
        self.store = RedisStore(self.config.redis)
        self.config_path = tmp_path / "ai-saas-config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))

    def entries(self) -> list[tuple[str, str, dict[str, str]]]:
        """(stream, entry id, fields) of every stream entry, oldest first per stream."""
        return [(stream, entry_id, fields) for stream in self.keys.streams()
                for entry_id, fields in self.rclient.xrange(stream)]

    def into_ledger(self, request_ids: set[str], *, trim: bool = True) -> None:
        """Record those requests' stream entries in the ledger; with ``trim``, delete
        them from the stream afterwards (the worker's acknowledgement and trim)."""
        chosen = [e for e in self.entries() if e[2]["request_id"] in request_ids]
        assert len(chosen) == len(request_ids)
        self.ledger.record([parse_entry(f"{stream} {entry_id}", fields)
                            for stream, entry_id, fields in chosen], self.pricing)
        if trim:
            for stream, entry_id, _ in chosen:
                self.rclient.xdel(stream, entry_id)

    def audit(self) -> dict[str, TenantAudit]:
        return {r.tenant_id: r for r in audit(self.config, self.store, self.ledger, PERIOD)}

    def cli(self, *extra: str) -> int:
        return main(["billing", "audit", "--period", PERIOD, "-c", str(self.config_path),
                     "--database", self.ledger_url, *extra])

    def close(self) -> None:
        self.store.close()
        self.ledger.close()


@pytest.fixture
def deployment(make_config: Callable[..., dict[str, Any]], rclient: redis.Redis,
               ledger_url: str, tmp_path: Path) -> Iterator[Deployment]:
    made = Deployment(make_config(), rclient, ledger_url, tmp_path)
    yield made
    made.close()


@pytest.fixture
def traffic(deployment: Deployment) -> dict[str, list[str]]:
    """Twelve requests of three tenants through the Starlette app (real Redis): tenant ->
    request ids. globex's first four go to the ledger and leave the stream, its next two
    are in the ledger and still in the stream; the rest only in the stream."""
    ids: dict[str, list[str]] = {"acme": [], "globex": [], "initech": []}
    with TestClient(make_starlette_app(deployment.raw)) as client:
        for n in range(12):
            tenant = ("acme", "globex", "initech", "globex")[n % 4]
            ids[tenant].append(chat(client, tenant, 10 + n, 20 + 2 * n))
    globex = ids["globex"]
    deployment.into_ledger(set(globex[:4]) | {ids["initech"][0]})
    deployment.into_ledger(set(globex[4:6]), trim=False)
    return ids


def tokens_of(deployment: Deployment, request_ids: list[str]) -> int:
    fields = {f["request_id"]: f for _, _, f in deployment.entries()}
    rows = {}
    with deployment.ledger.reading() as conn:
        from ai_saas_middleware.billing import tables as t

        for r in conn.execute(t.usage_events.select()):
            rows[r.request_id] = r.prompt_tokens + r.completion_tokens
    return sum(rows[i] if i in rows else
               int(fields[i]["prompt_tokens"]) + int(fields[i]["completion_tokens"])
               for i in request_ids)


def test_after_traffic_every_tenant_adds_up_side_by_side(
        deployment: Deployment, traffic: dict[str, list[str]]) -> None:
    report = deployment.audit()

    assert set(report) == {"acme", "globex", "initech"}
    assert all(r.status == "ok" and r.difference == 0 for r in report.values())
    globex = report["globex"]
    assert globex.ledger.events == 6
    assert globex.stream.events == 0  # its two still in the stream are in the ledger: once
    assert globex.settled.events == globex.union.events == 6
    assert globex.counter == globex.settled.tokens == tokens_of(deployment, traffic["globex"])
    acme = report["acme"]
    assert (acme.stream.events, acme.ledger.events) == (3, 0)
    initech = report["initech"]  # the enterprise tier: unlimited, and counted all the same
    assert (initech.stream.events, initech.ledger.events) == (2, 1)
    assert initech.counter == tokens_of(deployment, traffic["initech"])
    assert all(r.in_flight.events == 0 and r.spool.events == 0 for r in report.values())


def test_requests_in_flight_and_spooled_settlements_add_up_too(
        deployment: Deployment, traffic: dict[str, list[str]]) -> None:
    gateway = Gateway(deployment.raw)
    info = RequestInfo("POST", "/ai/chat", {"content-type": "application/json",
                                            "authorization": f"Bearer {API_KEYS['acme']}"},
                       b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 9}')
    running = gateway.admit(info)  # admitted, its handler still running
    spooled = gateway.admit(info)  # answered, its settlement waiting for Redis
    assert running.allowed and spooled.allowed
    assert spooled.ticket is not None
    gateway.spool.append(gateway._settle_call(spooled.ticket, Outcome(200, provider_usage=(5, 6)),
                                              spooled.context))
    try:
        acme = deployment.audit()["acme"]
        assert acme.status == "ok", acme.notes
        assert acme.in_flight.events == 2  # both reservations are held: the counter has them
        assert acme.counter == acme.settled.tokens + acme.in_flight.tokens
        assert (acme.spool.events, acme.spool.tokens) == (1, 11)  # not on the counter yet
        assert acme.union.events == acme.settled.events + 1
        assert any("wait in the spool" in note and "1 still hold" in note
                   for note in acme.notes)

        gateway.spool.replay(gateway._run)  # Redis is there: the settlement runs now
        acme = deployment.audit()["acme"]
        assert acme.status == "ok"
        assert (acme.in_flight.events, acme.spool.events) == (1, 0)
        assert acme.stream.events == 4
    finally:
        gateway.close()


def test_an_event_lost_before_the_ledger_had_it_is_caught(
        deployment: Deployment, traffic: dict[str, list[str]]) -> None:
    lost = traffic["acme"][1]
    [(stream, entry_id, fields)] = [e for e in deployment.entries()
                                    if e[2]["request_id"] == lost]
    deployment.rclient.xdel(stream, entry_id)  # gone from the stream, never in the ledger

    report = deployment.audit()

    tokens = int(fields["prompt_tokens"]) + int(fields["completion_tokens"])
    assert report["acme"].status == "differs"
    assert report["acme"].difference == tokens
    assert "lost" in report["acme"].notes[0]
    assert report["globex"].ok and report["initech"].ok
    assert deployment.cli() == 1


def test_a_counter_counted_twice_is_caught(deployment: Deployment,
                                           traffic: dict[str, list[str]],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    counter = deployment.keys.tenant("globex").quota(PERIOD)
    deployment.rclient.incrby(counter, 44)  # a settlement's tokens added a second time

    assert deployment.audit()["globex"].difference == 44
    capsys.readouterr()
    assert deployment.cli() == 1
    err = capsys.readouterr().err
    assert "globex (+44 tokens)" in err and "acme" not in err


def test_the_legitimate_differences_are_explained_not_failed(
        deployment: Deployment, traffic: dict[str, list[str]]) -> None:
    rc = deployment.rclient
    acme = deployment.keys.tenant("acme")
    # A request settled twice (a spool replay after its settled marker expired): a second
    # stream entry, its tokens counted again; the ledger keeps one row.
    [(stream, _, fields)] = [e for e in deployment.entries()
                             if e[2]["request_id"] == traffic["acme"][0]]
    rc.xadd(stream, fields)
    rc.incrby(acme.quota(PERIOD), int(fields["prompt_tokens"]) + int(fields["completion_tokens"]))
    # An entry the worker rejects (its cost is not a decimal), whose tokens settle.lua
    # counted: kept in rejected_events, on the counter, not billed.
    bad = {**fields, "request_id": "r-bad", "cost": "a lot"}
    rc.xadd(stream, bad)
    rc.incrby(acme.quota(PERIOD), int(fields["prompt_tokens"]) + int(fields["completion_tokens"]))
    # An event of another month (in the same stream): not this month's.
    rc.xadd(stream, {**fields, "request_id": "r-old", "ts": "2020-01-31T23:59:59.000Z"})

    report = deployment.audit()["acme"]

    assert report.status == "ok", report.notes
    assert (report.repeated.events, report.rejected.events) == (1, 1)
    assert report.settled.events == 3  # r-old is not of this month
    assert any("settled twice" in n for n in report.notes)
    assert any("rejected by the worker" in n for n in report.notes)


def test_a_month_whose_counter_expired_is_reported_not_failed(deployment: Deployment) -> None:
    stream = deployment.keys.tenant("globex").stream
    fields = {"request_id": "r-2020", "tenant_id": "globex", "tier": "pro",
              "model_id": "model-small", "provider": "openai", "prompt_tokens": "3",
              "completion_tokens": "4", "cost": "0.0000027", "status": "200",
              "ts": "2020-03-04T05:06:07.000Z"}
    entry_id = deployment.rclient.xadd(stream, fields)
    deployment.ledger.record([parse_entry(f"{stream} {entry_id}", fields)], deployment.pricing)
    deployment.rclient.xdel(stream, entry_id)

    [globex] = [r for r in audit(deployment.config, deployment.store, deployment.ledger,
                                 "2020-03") if r.tenant_id == "globex"]

    assert globex.status == "no counter" and globex.ok
    assert globex.counter is None and globex.ledger.tokens == 7


def test_the_command_prints_json_and_a_table(deployment: Deployment,
                                             traffic: dict[str, list[str]],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert deployment.cli("--format", "json") == 0
    rows = {r["tenant_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"acme", "globex", "initech"}
    globex = rows["globex"]
    assert globex["status"] == "ok" and globex["difference"] == 0
    assert globex["ledger"] == {"events": 6, "tokens": globex["counter"]}
    assert set(globex) >= {"counter", "in_flight", "spool", "stream", "ledger", "union",
                           "expected", "notes"}

    assert deployment.cli() == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("tenant"))
    assert header.split() == ["tenant", "counter", "in", "flight", "spool", "stream",
                              "ledger", "rejected", "twice", "expected", "diff", "status"]
    assert f"every tenant adds up for {PERIOD}." in out


def test_through_the_worker_it_adds_up_and_a_loss_before_the_worker_is_caught(
        deployment: Deployment) -> None:
    from ai_saas_middleware.billing.worker import Worker

    with TestClient(make_starlette_app(deployment.raw)) as client:
        ids = [chat(client, ("acme", "globex")[n % 2], 7 + n, 11 + n) for n in range(8)]
    [(stream, entry_id, fields)] = [e for e in deployment.entries()
                                    if e[2]["request_id"] == ids[3]]
    deployment.rclient.xdel(stream, entry_id)  # lost before the worker saw it
    worker = Worker(deployment.raw, ledger_url=deployment.ledger_url)
    try:
        assert worker.drain(30) == 7
    finally:
        worker.close()

    report = deployment.audit()

    assert report["acme"].status == "ok" and report["acme"].ledger.events == 4
    globex = report["globex"]
    assert globex.status == "differs"
    assert globex.ledger.events == 3 and globex.stream.events == 0
    assert globex.difference == int(fields["prompt_tokens"]) + int(fields["completion_tokens"])


def test_a_ledger_that_cannot_be_opened_is_a_message_not_a_traceback(
        deployment: Deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    unopenable = f"sqlite:///{tmp_path / 'no-such-dir' / 'ledger.sqlite3'}"
    code = main(["billing", "audit", "--period", PERIOD, "-c", str(deployment.config_path),
                 "--database", unopenable])
    err = capsys.readouterr().err
    assert code == 1
    assert "cannot be read" in err and "unable to open database file" in err
    assert "Traceback" not in err
