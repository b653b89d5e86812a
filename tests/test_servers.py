"""A client that hangs up mid-stream is billed once, under the servers apps deploy on.

The plain WSGI middleware (``servers_app.py``) is served by Werkzeug's threaded server
(the demo's ``serve_wsgi_in_thread``, in this process) and by gunicorn's ``sync`` and
``gthread`` workers (subprocesses, ``python -m gunicorn``). A raw-socket client reads the
first chunk of a stream and resets the connection; the app then streams on, the server's
next write fails, and the server closes the body. The test waits (with a deadline) for
the request's event, then checks the ledger: one event, marked as a disconnect, billed
what was produced, and the tenant's counter equal to it (the reservation settled); and
again once the server stopped, so that nothing settles twice.

``pytest -m servers`` runs these alone; they run in the default suite too.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEYS, ROOT
from servers_app import CHUNKS, CONFIG_ENV, HUNG_UP, PRODUCED, WORD, make_app

from ai_saas_middleware.demo import serve_wsgi_in_thread
from ai_saas_middleware.estimate import estimate_tokens

pytestmark = pytest.mark.servers

TESTS = Path(__file__).resolve().parent
BODY = json.dumps({"messages": [{"role": "user", "content": "Stream me some tokens."}],
                   "max_tokens": 64}).encode()
Events = Callable[[], list[dict[str, str]]]


def request(path: str, extra: bytes = b"") -> bytes:
    """A streaming AI request of globex; ``extra`` is sent after its body."""
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {API_KEYS['globex']}\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY + extra


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a reset (RST), as a client killed mid-read does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def response_head(received: bytes) -> tuple[int, dict[str, str]]:
    head = received.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), {name.lower(): value for name, value in headers.items()}


def hang_up_mid_stream(port: int, signals: Path) -> str:
    """Read the response's head and first chunk, reset the connection, tell the app the
    client is gone; the request id the response named."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(request("/ai/stream/waits"))
        received = b""
        while b"data: " not in received.partition(b"\r\n\r\n")[2]:
            data = sock.recv(65536)
            assert data, f"the server closed the stream early: {received!r}"
            received += data
    finally:
        reset(sock)
    (signals / HUNG_UP).write_text("")
    status, headers = response_head(received)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    return headers["x-request-id"]


def wait_for_event(events: Events, request_id: str, timeout: float = 10.0
                   ) -> list[dict[str, str]]:
    """The events of ``request_id``, once there is one (or the deadline passed)."""
    deadline = time.monotonic() + timeout
    while True:
        mine = [e for e in events() if e["request_id"] == request_id]
        if mine or time.monotonic() > deadline:
            return mine
        time.sleep(0.01)


def check_billed_once(events: Events, quota_used: Callable[[str], int], request_id: str,
                      signals: Path) -> None:
    """One event for ``request_id``: a disconnect, billed what the app produced (at least
    the chunk the client read), the tenant's counter equal to it."""
    [event] = wait_for_event(events, request_id)
    assert event["client_disconnected"] == "true"
    assert event["usage_source"] == "estimate" and event["status"] == "200"
    produced = int((signals / PRODUCED).read_text())  # written before the settlement
    assert 1 <= produced < CHUNKS  # the app stopped when the server could not write
    completion = int(event["completion_tokens"])
    assert 0 < completion <= estimate_tokens(len(WORD) * produced)
    assert quota_used("globex") == int(event["prompt_tokens"]) + completion
    assert events() == [event]  # and nothing else was billed


@pytest.fixture
def signals(tmp_path: Path) -> Path:
    folder = tmp_path / "signals"
    folder.mkdir()
    return folder


def test_werkzeug_threaded_bills_a_client_hanging_up_mid_stream_once(
        make_config: Callable[..., dict[str, Any]], events: Events,
        quota_used: Callable[[str], int], signals: Path) -> None:
    app = make_app(make_config(), signals)
    try:
        with serve_wsgi_in_thread(app) as server:
            request_id = hang_up_mid_stream(server.port, signals)
            check_billed_once(events, quota_used, request_id, signals)
            assert server.in_flight.wait_idle(10)
        # Stopped (after waiting for requests in flight): nothing settled again.
        check_billed_once(events, quota_used, request_id, signals)
    finally:
        app.gateway.close()


def reset_after_the_whole_stream(port: int) -> str:
    """A client that sent a byte past its request (as a pipelining client does), reads
    the whole stream, then resets the connection; the request id."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(request("/ai/stream/whole", extra=b"X"))
        received = b""
        while not received.endswith(b"0\r\n\r\n"):  # the chunked body's end
            data = sock.recv(65536)
            assert data, f"the server closed the stream early: {received!r}"
            received += data
    finally:
        reset(sock)
    return response_head(received)[1]["x-request-id"]


def test_werkzeug_threaded_bills_a_request_whose_client_reset_after_the_stream(
        make_config: Callable[..., dict[str, Any]], events: Events,
        quota_used: Callable[[str], int], signals: Path) -> None:
    # Werkzeug's run_wsgi drains the socket before it calls the body's close(), in the
    # same finally; the reset makes that read raise, and close() (where the middleware
    # settles a chunked stream) was skipped: the event was lost and the reservation held.
    # serve_wsgi_in_thread closes such a body itself.
    app = make_app(make_config(), signals)
    try:
        with serve_wsgi_in_thread(app) as server:
            request_id = reset_after_the_whole_stream(server.port)
            [event] = wait_for_event(events, request_id)
        assert event["client_disconnected"] == "false"  # the server wrote it all
        assert (event["usage_source"], event["completion_tokens"]) == ("provider", str(CHUNKS))
        assert quota_used("globex") == int(event["prompt_tokens"]) + CHUNKS
        assert events() == [event]
    finally:
        app.gateway.close()


def test_plain_werkzeug_server_bills_a_request_whose_client_reset_after_the_stream(
        make_config: Callable[..., dict[str, Any]], events: Events,
        quota_used: Callable[[str], int], signals: Path) -> None:
    import gc
    import threading

    from werkzeug.serving import WSGIRequestHandler, make_server

    served = threading.Event()

    class Handler(WSGIRequestHandler):  # Werkzeug's own, telling when it is done
        def handle(self) -> None:
            try:
                super().handle()
            finally:
                served.set()

    app = make_app(make_config(), signals)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        request_id = reset_after_the_whole_stream(server.port)
        assert served.wait(10)
        gc.collect()  # whatever the server left behind is gone
        assert len([e for e in events() if e["request_id"] == request_id]) == 1
    finally:
        server.shutdown()
        server.server_close()
        app.gateway.close()


@contextmanager
def gunicorn(worker: str, spec: Path, log: Path) -> Iterator[int]:
    """``python -m gunicorn -w 1 -k <worker>`` serving ``servers_app:app`` on a free
    loopback port (the one it reports); stopped with SIGTERM (graceful) at the end."""
    env = {**os.environ, CONFIG_ENV: str(spec),
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT),
                                          os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "gunicorn", "-w", "1", "-k", worker, "--threads", "4",
            "--bind", "127.0.0.1:0", "--graceful-timeout", "10", "servers_app:app"]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=TESTS, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not (found := re.search(r"Listening at: http://127\.0\.0\.1:(\d+)",
                                      log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        yield int(found[1])
    finally:
        proc.terminate()
        try:
            assert proc.wait(timeout=20) == 0, log.read_text()
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung worker
            proc.kill()
            proc.wait()
            raise


@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_gunicorn_bills_a_client_hanging_up_mid_stream_once(
        worker: str, make_config: Callable[..., dict[str, Any]], events: Events,
        quota_used: Callable[[str], int], signals: Path, tmp_path: Path) -> None:
    spec = tmp_path / "app.json"
    spec.write_text(json.dumps({"config": make_config(), "signals": str(signals)}))
    with gunicorn(worker, spec, tmp_path / "gunicorn.log") as port:
        request_id = hang_up_mid_stream(port, signals)
        check_billed_once(events, quota_used, request_id, signals)
    # gunicorn stopped gracefully (its worker exited): nothing settled again.
    check_billed_once(events, quota_used, request_id, signals)
    assert "Traceback" not in (tmp_path / "gunicorn.log").read_text()
