"""TLS with a private CA on both stores, a wrong CA refused as an outage, client
certificates; and a URL's password never in a message or a log line."""

from __future__ import annotations

import inspect
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEYS

from ai_saas_middleware import AsyncGateway, Gateway, RequestInfo
from ai_saas_middleware.embedded import LocalServer, start_server
from ai_saas_middleware.store.redis import _redact
from ai_saas_middleware.types import Outcome

trustme = pytest.importorskip("trustme")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _maybe(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _info() -> RequestInfo:
    return RequestInfo("POST", "/ai/chat", {"content-type": "application/json",
                                            "x-api-key": API_KEYS["globex"]}, b"{}")


class TLSServer:
    def __init__(self, server: LocalServer, port: int, files: dict[str, Path]):
        self.server, self.port, self.files = server, port, files

    def url(self, **params: Path | str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"rediss://127.0.0.1:{self.port}/0?{query}"


@pytest.fixture(params=["no", "yes"], ids=["server-auth", "mutual-tls"])
def tls_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TLSServer]:
    """A redis-server speaking TLS only, its certificate from a private CA made here;
    with ``mutual-tls`` it also wants a client certificate from that CA."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("ai-saas-client")
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "server.pem",
             "key": tmp_path / "server.key", "client": tmp_path / "client.pem",
             "client_key": tmp_path / "client.key", "other_ca": tmp_path / "other.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    trustme.CA().cert_pem.write_to_path(str(files["other_ca"]))
    port = _free_port()
    try:
        server = start_server(args=(
            "--tls-port", str(port), "--tls-cert-file", str(files["cert"]),
            "--tls-key-file", str(files["key"]), "--tls-ca-cert-file", str(files["ca"]),
            "--tls-auth-clients", request.param))
    except RuntimeError:
        pytest.skip("this Redis-compatible server was built without TLS")
    tls = TLSServer(server, port, files)
    tls.mutual = request.param == "yes"  # type: ignore[attr-defined]
    yield tls
    server.stop()


@pytest.mark.parametrize("twin", ["sync", "async"])
async def test_admit_and_settle_over_tls_with_a_private_ca(
        twin: str, tls_server: TLSServer, make_config: Callable[..., dict[str, Any]],
        tmp_path: Path) -> None:
    params: dict[str, Path | str] = {"ssl_ca_certs": tls_server.files["ca"]}
    if tls_server.mutual:  # type: ignore[attr-defined]
        params |= {"ssl_certfile": tls_server.files["client"],
                   "ssl_keyfile": tls_server.files["client_key"]}
    cls = Gateway if twin == "sync" else AsyncGateway
    gateway = cls(make_config(redis={"url": tls_server.url(**params), "retryInterval": "1h"}))
    decision = await _maybe(gateway.admit(_info()))
    assert decision.allowed and not decision.ticket.local  # admitted by Redis, not locally
    await _maybe(gateway.settle(decision.ticket, Outcome(200, provider_usage=(3, 2)),
                                decision.context))
    assert not gateway.store.health.is_down()
    assert not list((tmp_path / "spool").glob("spool-*.jsonl"))  # written, not spooled
    import redis as redis_py

    plain = redis_py.Redis.from_url(tls_server.url(**params))
    streams = list(plain.scan_iter(match="*:usage"))
    assert len(streams) == 1 and plain.xlen(streams[0]) == 1
    plain.close()
    await _maybe(gateway.close())


@pytest.mark.parametrize("twin", ["sync", "async"])
async def test_a_server_certificate_from_another_ca_is_refused_as_an_outage(
        twin: str, tls_server: TLSServer, make_config: Callable[..., dict[str, Any]]) -> None:
    params: dict[str, Path | str] = {"ssl_ca_certs": tls_server.files["other_ca"],
                                     "ssl_certfile": tls_server.files["client"],
                                     "ssl_keyfile": tls_server.files["client_key"]}
    cls = Gateway if twin == "sync" else AsyncGateway
    gateway = cls(make_config(redis={"url": tls_server.url(**params),
                                     "onUnavailable": "closed", "retryInterval": "1h"}))
    decision = await _maybe(gateway.admit(_info()))
    assert decision.status == 503  # never a silent accept
    assert gateway.store.health.is_down()
    assert "CERTIFICATE_VERIFY_FAILED" in gateway.store.health.last_error.upper().replace(
        " ", "_")
    await _maybe(gateway.close())


@pytest.mark.parametrize("twin", ["sync", "async"])
async def test_ssl_cert_reqs_none_skips_verification_on_both_stores(
        twin: str, tls_server: TLSServer, make_config: Callable[..., dict[str, Any]]) -> None:
    if tls_server.mutual:  # type: ignore[attr-defined]
        pytest.skip("the server wants a client certificate")
    cls = Gateway if twin == "sync" else AsyncGateway
    gateway = cls(make_config(redis={"url": tls_server.url(ssl_cert_reqs="none")}))
    decision = await _maybe(gateway.admit(_info()))
    assert decision.allowed and not decision.ticket.local
    await _maybe(gateway.close())


# ------------------------------------------------------------------ redaction (issue 7, 16)

@pytest.mark.parametrize("url", [
    "redis://:s3cret@127.0.0.1:6379/0",
    "redis://alice:s3cret@127.0.0.1:6379/0",
    "rediss://alice:s3cret@host:6380/0?ssl_ca_certs=/ca.pem",
    "redis://127.0.0.1:6379/0?password=s3cret",
    "redis://127.0.0.1:6379/0?db=1&password=s3cret",
    "redis://127.0.0.1:6379/0?username=alice&password=s3cret&db=2",
    "redis://127.0.0.1:6379/0?PASSWORD=s3cret",
    "rediss://h:1/0?ssl_keyfile=/k&ssl_password=s3cret",
    "unix://:s3cret@/run/redis.sock?db=0",
    "unix:///run/redis.sock?password=s3cret",
    "redis+cluster://:s3cret@node:7000",
])
def test_redact_hides_every_form_of_password(url: str) -> None:
    redacted = _redact(url)
    assert "s3cret" not in redacted and "alice" not in redacted
    assert "***" in redacted


def test_redact_keeps_what_locates_the_server() -> None:
    assert _redact("redis://:p@10.0.0.5:6380/2?db=1&password=p") == \
        "redis://***@10.0.0.5:6380/2?db=1&password=***"


@pytest.mark.parametrize("twin", ["sync", "async"])
@pytest.mark.parametrize("form", ["userinfo", "query"])
async def test_no_log_line_of_a_failing_store_contains_the_password(
        twin: str, form: str, make_config: Callable[..., dict[str, Any]],
        caplog: pytest.LogCaptureFixture) -> None:
    server = start_server(args=("--requirepass", "right-one"))
    try:
        port = server.port
        urls = [f"redis://:Wr0ngPassw0rd@127.0.0.1:{port}/0" if form == "userinfo" else
                f"redis://127.0.0.1:{port}/0?password=Wr0ngPassw0rd",
                f"redis://:Wr0ngPassw0rd@127.0.0.1:{_free_port()}/0" if form == "userinfo"
                else f"redis://127.0.0.1:{_free_port()}/0?password=Wr0ngPassw0rd"]
        cls = Gateway if twin == "sync" else AsyncGateway
        for url in urls:  # a refused password, then an unreachable server
            gateway = cls(make_config(redis={"url": url, "onUnavailable": "open",
                                             "retryInterval": "1h"}))
            with caplog.at_level(logging.DEBUG, logger="ai_saas_middleware"):
                decision = await _maybe(gateway.admit(_info()))
                await _maybe(gateway.settle(decision.ticket, Outcome(200), decision.context))
            assert gateway.store.health.is_down()
            assert "Wr0ngPassw0rd" not in gateway.store.health.last_error
            await _maybe(gateway.close())
        lines = [r.getMessage() for r in caplog.records]
        assert lines  # the failures were logged...
        assert not any("Wr0ngPassw0rd" in line for line in lines)  # ...without the password
    finally:
        server.stop()
