"""The durable path end to end: Redis stopped for 10 s under concurrent traffic and started
again, a billing worker running throughout; every request a client saw answered (a 2xx
with its X-Request-ID) is in the ledger exactly once, the spool replayed, and
``ai-saas billing audit`` adds up, during the traffic and after it.

A real app (the Starlette test app under uvicorn on a loopback port), a private
redis-server whose dataset survives the restart (``SHUTDOWN SAVE``, then a new process on
the same port: an operator's restart), the ledger on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults import Load, PrivateRedis, fault_config, one_request, spool_files, wait_until
from sqlalchemy import func, select
from starlette_app import make_starlette_app

from ai_saas_middleware import load_config
from ai_saas_middleware.billing import tables as t
from ai_saas_middleware.billing.audit import TenantAudit, audit
from ai_saas_middleware.billing.ledger import Ledger
from ai_saas_middleware.billing.worker import Worker
from ai_saas_middleware.demo import serve_in_thread
from ai_saas_middleware.embedded import find_server_binary
from ai_saas_middleware.store.redis import RedisStore

OUTAGE_S = 10.0  # the figure: Redis stays down this long, under traffic
PERIOD = time.strftime("%Y-%m", time.gmtime())


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[PrivateRedis]:
    binary = shutil.which("redis-server") or find_server_binary()
    if binary is None:
        pytest.skip("no redis-server or embedded Valkey to stop and start")
    server = PrivateRedis(binary, tmp_path / "data")
    yield server
    server.close()


class WorkerThread:
    """A billing worker running in a thread until :meth:`stop`."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.thread = threading.Thread(target=worker.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the worker did not stop"
        self.worker.close()


def audit_now(config: dict[str, object], ledger_url: str, spool: Path) -> list[TenantAudit]:
    loaded = load_config(config)
    store, ledger = RedisStore(loaded.redis), Ledger(ledger_url)
    try:
        return audit(loaded, store, ledger, PERIOD, spool_dir=spool)
    finally:
        store.close()
        ledger.close()


@pytest.mark.billing_faults
def test_redis_stopped_for_10s_under_traffic_every_request_is_in_the_ledger_once(
        srv: PrivateRedis, key_prefix: str, tmp_path: Path, ledger_url: str) -> None:
    spool = tmp_path / "spool"
    config = fault_config(srv.url, key_prefix, spool, "open")
    worker = WorkerThread(Worker(config, ledger_url=ledger_url, name="w1"))
    try:
        with serve_in_thread(make_starlette_app(config)) as app:
            load = Load(app.url, tenants=("initech", "globex", "acme"), workers=4,
                        pause_s=0.02)
            with load:
                load.wait_for(lambda r: r.admitted, 20, what="admitted before the outage")
                srv.stop()
                down = time.monotonic()
                load.wait_for(lambda r: r.admitted and r.started > down, 20,
                              what="served during the outage")
                time.sleep(max(0.0, down + OUTAGE_S - time.monotonic()))  # stays down
                srv.start()
                up = time.monotonic()
                load.wait_for(lambda r: r.admitted and r.started > up, 20,
                              what="admitted after the restart")
                wait_until(lambda: not spool_files(spool), 20, "the spool to be replayed")
                # Under live traffic, with the worker moving events: it adds up.
                during_traffic = audit_now(config, ledger_url, spool)
            # One more request once the load has stopped: any settlement spooled at the
            # very end is replayed by it.
            last = wait_until(lambda: (r := one_request(app.url)).admitted and r, 10,
                              "an admitted request after the load")
            wait_until(lambda: not spool_files(spool), 20, "the spool to be replayed")
    finally:
        worker.stop()
    drained = Worker(config, ledger_url=ledger_url, name="w2")
    try:
        drained.drain(60)
    finally:
        drained.close()

    results = [*load.results, last]
    admitted = Counter(r.request_id for r in results if r.admitted)
    in_window = {r.request_id for r in results if r.admitted and down < r.started < up}
    ledger = Ledger(ledger_url)
    try:
        with ledger.reading() as conn:
            rows = Counter(dict(conn.execute(
                select(t.usage_events.c.request_id, func.count())
                .group_by(t.usage_events.c.request_id)).all()))
    finally:
        ledger.close()
    final = audit_now(config, ledger_url, spool)

    assert len(in_window) >= 20  # the outage was under traffic, served (onUnavailable: open)
    assert all(n == 1 for n in admitted.values())  # each request id answered once
    assert in_window <= set(rows)  # every request of the window: spool replayed, in the ledger
    assert set(rows) == set(admitted)  # every answered request, and nothing else
    assert all(n == 1 for n in rows.values())  # none twice
    for report in (during_traffic, final):
        assert [r for r in report if r.status != "ok"] == [], [r.notes for r in report]
        assert all(r.repeated.events == 0 for r in report)  # no request settled twice
    assert sum(r.ledger.events for r in final) == len(admitted)
    assert all(r.stream.events == r.spool.events == r.in_flight.events == 0 for r in final)
    assert all(r.counter == r.ledger.tokens for r in final if r.ledger.events)
