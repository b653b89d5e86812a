"""The plain WSGI middleware, black box, on a minimal WSGI app (no framework), real Redis.

The tests play the WSGI server themselves where they need to say exactly what a server
does (a chunked ``wsgi.input``, a server that stops iterating when the client is gone,
one that never calls ``close()``), with ``wsgiref.validate`` checking the middleware's
side of PEP 3333; and they put the middleware behind a real HTTP server (Werkzeug's,
over loopback) for a chunked upload and a client that hangs up mid-stream.

Refusals are compared with the ASGI adapter's, byte for byte: the same request through
the Starlette app of ``starlette_app`` gives the same status, headers and body.
"""

from __future__ import annotations

import io
import json
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import httpx
import pytest
from conftest import API_KEYS, PrefixCommands, bearer
from replies import (
    CHAT,
    COMPLETION_TOKENS,
    PROMPT_TOKENS,
    SSE_WORDS,
    EveryModelDown,
    completion,
    sse_body,
)
from starlette.applications import Starlette
from starlette.testclient import TestClient
from starlette_app import ROUTES

from ai_saas_middleware import load_config
from ai_saas_middleware.demo import serve_wsgi_in_thread
from ai_saas_middleware.gateway import Gateway
from ai_saas_middleware.starlette import AISaaSMiddleware as StarletteMiddleware
from ai_saas_middleware.starlette import admin_app
from ai_saas_middleware.usage import estimate_prompt_tokens, estimate_tokens
from ai_saas_middleware.wsgi import (
    AISaaSMiddleware,
    UsageApp,
    environ_headers,
    request_path,
)

Environ = dict[str, Any]
SSE = "text/event-stream; charset=utf-8"


# ------------------------------------------------------------------ the app under test


class TrackedBody:
    """A response body that remembers being closed (WSGI's close() must reach the app)."""

    def __init__(self, chunks: Iterable[bytes]):
        self.chunks = chunks
        self.closes = 0

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        self.closes += 1


def read_body(environ: Environ) -> bytes:
    length = environ.get("CONTENT_LENGTH")
    return environ["wsgi.input"].read(int(length)) if length else environ["wsgi.input"].read()


class PlainApp:
    """A WSGI app with no framework at all; ``bodies`` keeps the bodies it returned."""

    def __init__(self) -> None:
        self.bodies: list[TrackedBody] = []
        self.seen: list[Environ] = []

    def respond(self, start_response: Any, status: str, content_type: str,
                chunks: Iterable[bytes]) -> TrackedBody:
        start_response(status, [("Content-Type", content_type), ("X-App", "plain")])
        body = TrackedBody(chunks)
        self.bodies.append(body)
        return body

    def __call__(self, environ: Environ, start_response: Any) -> Iterable[bytes]:
        self.seen.append(environ)
        path = environ["PATH_INFO"]
        if path == "/ai/chat":
            payload = json.loads(read_body(environ) or b"{}")
            prompt, completion_ = payload.get("reply_usage", [PROMPT_TOKENS, COMPLETION_TOKENS])
            reply = completion(environ["ai_saas.context"].model.id, "Hi!", prompt, completion_)
            return self.respond(start_response, "200 OK", "application/json",
                                [json.dumps(reply).encode()])
        if path == "/ai/stream":
            return self.respond(start_response, "200 OK", SSE, sse_body())
        if path == "/ai/stream-stalls":  # 3 chunks, then keep-alives until a write fails
            def stalls() -> Iterator[bytes]:
                yield from sse_body()[:3]
                for _ in range(5000):
                    time.sleep(0.02)
                    yield b": still thinking\n\n"
            return self.respond(start_response, "200 OK", SSE, stalls())
        if path == "/ai/write":  # the legacy write() callable of PEP 3333
            write = start_response("200 OK", [("Content-Type", SSE)])
            for chunk in sse_body():
                write(chunk)
            return []
        if path == "/ai/boom":
            raise RuntimeError("the handler has a bug")
        if path == "/ai/all-down":  # every model's call fails: NoHealthyModel leaves
            environ["ai_saas.context"].execute(EveryModelDown())
        if path == "/ai/boom-mid-stream":
            def half() -> Iterator[bytes]:
                yield sse_body()[0]
                raise RuntimeError("the provider stream broke")
            return self.respond(start_response, "200 OK", SSE, half())
        if path in ("/ai/echo", "/echo"):
            return self.respond(start_response, "200 OK", "application/octet-stream",
                                [read_body(environ)])
        if path == "/":
            return self.respond(start_response, "200 OK", "text/plain", [b"home"])
        return self.respond(start_response, "404 Not Found", "text/plain", [b"not found"])


class SizedInput(io.BytesIO):
    """A ``wsgi.input`` that counts its reads and hands out at most ``piece`` bytes each."""

    def __init__(self, data: bytes, piece: int = 1 << 30):
        super().__init__(data)
        self.piece = piece
        self.reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        if size is None or size < 0:
            size = self.piece
        return super().read(min(size, self.piece))


class NeverRead(io.BytesIO):
    """A ``wsgi.input`` whose read would block on a real server: reading it is a bug."""

    def read(self, size: int | None = -1) -> bytes:
        raise AssertionError("the middleware read a stream it had no length for")


def environ_for(path: str, *, method: str = "POST", body: bytes = b"",
                headers: dict[str, str] | None = None, chunked: bool = False,
                stream: io.BytesIO | None = None) -> Environ:
    environ: Environ = {"REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path,
                        "QUERY_STRING": ""}
    setup_testing_defaults(environ)
    environ["wsgi.input"] = stream if stream is not None else io.BytesIO(body)
    if chunked:  # as Werkzeug's and gunicorn's servers present a chunked request
        environ["wsgi.input_terminated"] = True
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    elif stream is None:
        environ["CONTENT_LENGTH"] = str(len(body))
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"] = value
    return environ


class Served:
    """What a WSGI server got back: status, headers, and the body iterable (unread)."""

    def __init__(self, app: Callable[..., Iterable[bytes]], environ: Environ):
        self.status = ""
        self.headers: list[tuple[str, str]] = []
        self.written: list[bytes] = []  # through start_response's write()
        self.content = b""
        self.body = app(environ, self.start_response)
        self.chunks = iter(self.body)

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        self.status, self.headers = status, headers
        return self.written.append

    @property
    def code(self) -> int:
        return int(self.status.split()[0])

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)

    def read_all(self, close: bool = True) -> bytes:
        """Iterate the body to its end (and close it, as a server does)."""
        self.content = b"".join(self.written) + b"".join(self.chunks)
        if close:
            self.close()
        return self.content

    def done(self) -> Served:
        self.read_all()
        return self

    def close(self) -> None:
        close = getattr(self.body, "close", None)
        if close is not None:
            close()


@pytest.fixture
def plain() -> PlainApp:
    return PlainApp()


@pytest.fixture
def make_middleware(make_config: Callable[..., dict[str, Any]], plain: PlainApp
                    ) -> Iterator[Callable[..., AISaaSMiddleware]]:
    made: list[AISaaSMiddleware] = []

    def make(*, resolver: Any = None, **config: Any) -> AISaaSMiddleware:
        middleware = AISaaSMiddleware(plain, config=make_config(**config), resolver=resolver)
        made.append(middleware)
        return middleware

    yield make
    for middleware in made:
        middleware.gateway.close()


@pytest.fixture
def app(make_middleware: Callable[..., AISaaSMiddleware]) -> AISaaSMiddleware:
    return make_middleware()


def serve(app: Callable[..., Iterable[bytes]], path: str, **kwargs: Any) -> Served:
    """One request through the PEP 3333 validator (it checks what a server would see)."""
    return Served(validator(app), environ_for(path, **kwargs))


def ai_json(body: Any = CHAT, tenant: str = "globex") -> dict[str, Any]:
    return {"body": json.dumps(body).encode(),
            "headers": {**bearer(tenant), "Content-Type": "application/json"}}


def starlette_client(make_config: Callable[..., dict[str, Any]], key_prefix: str,
                     **config: Any) -> TestClient:
    """The ASGI adapter on ``starlette_app``'s app, under a key prefix of its own."""
    config.setdefault("redis", {})["keyPrefix"] = key_prefix + "asgi"
    app = Starlette(routes=ROUTES)
    app.add_middleware(StarletteMiddleware, config=make_config(**config))
    return TestClient(app)


# ------------------------------------------------------------------ request bodies


def test_ai_request_body_is_replayed_to_the_app_intact(app: AISaaSMiddleware,
                                                       plain: PlainApp, events: Any) -> None:
    raw = ('{"messages": [{"role": "user", "content": "h\\u00e9llo \u2713"}],\n'
           ' "max_tokens": 8}  \n').encode()
    served = serve(app, "/ai/echo", body=raw, headers={
        **bearer("globex"), "Content-Type": "application/json; charset=utf-8"})
    assert served.status == "200 OK"
    assert served.read_all() == raw
    assert plain.seen[0]["CONTENT_LENGTH"] == str(len(raw))
    assert len(events()) == 1


def test_chunked_body_is_read_to_its_end_and_replayed(app: AISaaSMiddleware,
                                                      events: Any) -> None:
    raw = json.dumps({**CHAT, "note": "sent in pieces of 7 bytes"}).encode()
    stream = SizedInput(raw, piece=7)
    served = serve(app, "/ai/echo", stream=stream, chunked=True, headers={
        **bearer("globex"), "Content-Type": "application/json"})
    assert served.code == 200
    assert served.read_all() == raw
    assert stream.reads > len(raw) // 7  # it took many reads: the pieces were joined
    assert len(events()) == 1


def test_body_without_length_on_an_unterminated_stream_is_not_read(
        app: AISaaSMiddleware, plain: PlainApp, events: Any) -> None:
    # No Content-Length and no wsgi.input_terminated: reading could wait forever on the
    # socket. Like Werkzeug, the middleware takes the body as empty.
    served = serve(app, "/ai/echo", stream=NeverRead(), headers=bearer("globex"))
    assert served.code == 200
    assert served.read_all() == b""
    [event] = events()
    assert event["status"] == "200"


def test_body_over_the_limit_with_content_length_is_413_unread(
        app: AISaaSMiddleware, events: Any) -> None:
    stream = SizedInput(b"x" * 64)
    environ = environ_for("/ai/chat", stream=stream, headers={
        **bearer("globex"), "Content-Type": "application/json",
        "Content-Length": str(10 * 1024 * 1024)})
    served = Served(validator(app), environ)
    assert served.status == "413 Payload Too Large"
    body = served.read_all()
    assert body == app.gateway.too_large().body
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert served.headers == [("content-type", "application/json"),
                              ("content-length", str(len(body)))]
    assert stream.reads == 0
    assert events() == []


def test_chunked_body_over_the_limit_is_413_without_reading_it_all(
        app: AISaaSMiddleware, events: Any) -> None:
    piece = 65536
    stream = SizedInput(b"x" * (10 * 1024 * 1024), piece=piece)
    served = serve(app, "/ai/chat", stream=stream, chunked=True, headers={
        **bearer("globex"), "Content-Type": "application/json"})
    assert served.code == 413
    assert json.loads(served.read_all())["error"]["code"] == "request_too_large"
    assert stream.reads <= 1_048_576 // piece + 1  # stopped at the 1 MiB limit
    assert events() == []


def test_content_length_that_is_not_a_number_is_400(app: AISaaSMiddleware) -> None:
    environ = environ_for("/ai/chat", body=b"{}", headers=bearer("globex"))
    environ["CONTENT_LENGTH"] = "12abc"
    served = Served(app, environ)
    assert served.status == "400 Bad Request"
    error = json.loads(served.read_all())["error"]
    assert error["code"] == "invalid_request" and "Content-Length" in error["message"]


def test_resolver_gets_the_environ_with_a_readable_body_and_the_app_still_gets_it(
        make_middleware: Callable[..., AISaaSMiddleware], events: Any) -> None:
    read_by_resolver: list[bytes] = []

    def resolver(environ: Environ) -> str | None:
        read_by_resolver.append(read_body(environ))  # e.g. a framework request's form
        return {"s-initech": "initech"}.get(environ.get("HTTP_COOKIE", "")[8:])

    app = make_middleware(resolver=resolver)
    raw = json.dumps(CHAT).encode()
    signed_in = serve(app, "/ai/echo", body=raw, headers={
        "Cookie": "session=s-initech", "Content-Type": "application/json"})
    assert signed_in.code == 200 and signed_in.read_all() == raw
    anonymous = serve(app, "/ai/echo", **ai_json(tenant="acme"))
    assert anonymous.code == 200 and anonymous.read_all() == raw
    assert read_by_resolver == [raw, raw]
    # (sorted: two shards' streams do not order events of the same millisecond)
    assert sorted(e["tenant_id"] for e in events()) == ["acme", "initech"]


# ------------------------------------------------------------------ refusals and headers


REFUSALS: list[tuple[str, dict[str, str], bytes]] = [
    ("missing key", {"Content-Type": "application/json"}, json.dumps(CHAT).encode()),
    ("unknown key", {"Authorization": "Bearer not-a-real-key",
                     "Content-Type": "application/json"}, json.dumps(CHAT).encode()),
    ("malformed JSON", {**bearer("globex"), "Content-Type": "application/json"},
     b'{"messages": ['),
    ("JSON array", {**bearer("globex"), "Content-Type": "application/json"}, b"[1, 2]"),
    ("wrong content type", {**bearer("globex"), "Content-Type": "text/plain"}, b"hello"),
    ("body too large", {**bearer("globex"), "Content-Type": "application/json"},
     b"x" * (1024 * 1024 + 1)),
    ("impossible quality", {**bearer("globex"), "Content-Type": "application/json",
                            "X-AI-Min-Quality": "0.99"}, json.dumps(CHAT).encode()),
    ("bad requirement", {**bearer("globex"), "Content-Type": "application/json",
                         "X-AI-Max-Cost": "cheap"}, json.dumps(CHAT).encode()),
    ("bad max_tokens", {**bearer("globex"), "Content-Type": "application/json"},
     b'{"max_tokens": 0}'),
]


@pytest.mark.parametrize(("name", "headers", "body"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_are_byte_for_byte_those_of_the_asgi_adapter(
        name: str, headers: dict[str, str], body: bytes, app: AISaaSMiddleware,
        make_config: Callable[..., dict[str, Any]], key_prefix: str, events: Any) -> None:
    served = serve(app, "/ai/chat", body=body, headers=headers)
    wsgi_body = served.read_all()
    with starlette_client(make_config, key_prefix) as client:
        asgi = client.post("/ai/chat", content=body, headers=headers)
    assert served.code == asgi.status_code >= 400
    assert wsgi_body == asgi.content
    assert [(k.lower(), v) for k, v in served.headers] == \
        [(k.decode(), v.decode()) for k, v in asgi.headers.raw]
    assert events() == []


def test_rate_limit_refusal_matches_the_asgi_adapter(
        app: AISaaSMiddleware, make_config: Callable[..., dict[str, Any]],
        key_prefix: str) -> None:
    with starlette_client(make_config, key_prefix) as client:
        for _ in range(10):
            assert serve(app, "/ai/chat", **ai_json(tenant="acme")).done().code == 200
            assert client.post("/ai/chat", json=CHAT, headers=bearer("acme")).status_code == 200
        served = serve(app, "/ai/chat", **ai_json(tenant="acme"))
        asgi = client.post("/ai/chat", json=CHAT, headers=bearer("acme"))
    assert served.status == "429 Too Many Requests" and asgi.status_code == 429
    # The same bytes but for the seconds to wait, which depend on when each window began.
    def timeless_body(body: bytes) -> bytes:
        return re.sub(rb"retry in \d+s", b"retry in Ns", body)

    assert timeless_body(served.read_all()) == timeless_body(asgi.content)
    assert b"retry in Ns" in timeless_body(asgi.content)
    wsgi_headers = [(k.lower(), v) for k, v in served.headers]
    asgi_headers = [(k.decode(), v.decode()) for k, v in asgi.headers.raw]
    assert [k for k, _ in wsgi_headers] == [k for k, _ in asgi_headers]
    timeless = {"content-type", "ratelimit-limit", "ratelimit-remaining", "ratelimit-policy"}
    assert [h for h in wsgi_headers if h[0] in timeless] == \
        [h for h in asgi_headers if h[0] in timeless]
    assert 1 <= int(served.header("retry-after") or 0) <= 60


def test_quota_refusal_matches_the_asgi_adapter(
        make_middleware: Callable[..., AISaaSMiddleware],
        make_config: Callable[..., dict[str, Any]], key_prefix: str) -> None:
    big = {**CHAT, "max_tokens": 3000, "reply_usage": [12, 3000]}
    app = make_middleware()
    with starlette_client(make_config, key_prefix) as client:
        for _ in range(3):
            assert serve(app, "/ai/chat", **ai_json(big, "acme")).done().code == 200
            assert client.post("/ai/chat", json=big, headers=bearer("acme")).status_code == 200
        served = serve(app, "/ai/chat", **ai_json(big, "acme")).done()
        asgi = client.post("/ai/chat", json=big, headers=bearer("acme"))
    assert served.code == asgi.status_code == 429
    assert served.content == asgi.content
    assert json.loads(asgi.content)["error"]["code"] == "quota_exceeded"
    assert [k for k, _ in served.headers] == [k.decode() for k, _ in asgi.headers.raw]


def test_request_headers_are_read_from_the_environ_however_many_there_are() -> None:
    """Header names are worked out once per environ key and kept in a bounded cache:
    past its bound (a client sending ever new header names) they are still all read."""
    environ: Environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/ai/chat",
                        "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": "12",
                        "HTTP_AUTHORIZATION": "Bearer k", "HTTP_X_AI_MIN_QUALITY": "0.5",
                        "wsgi.input": io.BytesIO(), "SERVER_NAME": "h"}
    for i in range(1500):
        environ[f"HTTP_X_CUSTOM_{i}"] = str(i)
    for _ in range(2):  # the second time from the cache, as far as it reaches
        headers = environ_headers(environ)
        assert len(headers) == 1500 + 4
        assert headers["authorization"] == "Bearer k"
        assert headers["x-ai-min-quality"] == "0.5"
        assert (headers["content-type"], headers["content-length"]) == ("application/json",
                                                                        "12")
        assert all(headers[f"x-custom-{i}"] == str(i) for i in range(1500))


def test_admitted_response_keeps_the_apps_headers_and_adds_ours(
        app: AISaaSMiddleware, events: Any) -> None:
    served = serve(app, "/ai/chat", **ai_json())
    assert served.status == "200 OK"
    body = served.read_all()
    names = [k for k, _ in served.headers]
    assert names == ["Content-Type", "X-App", "x-request-id", "x-ai-model", "ratelimit-limit",
                     "ratelimit-remaining", "ratelimit-reset", "ratelimit-policy"]
    assert served.header("x-ai-model") == "model-small"
    assert served.header("ratelimit-remaining") == "99"
    assert served.header("ratelimit-policy") == "100;w=60"
    [event] = events()
    assert served.header("x-request-id") == event["request_id"]
    assert event["usage_source"] == "provider" and event["status"] == "200"
    assert json.loads(body)["model"] == "model-small"


# ------------------------------------------------------------------ settlement


def test_chunked_stream_is_settled_at_close_not_before_the_server_finished_writing(
        app: AISaaSMiddleware, plain: PlainApp, events: Any, quota_used: Any) -> None:
    """A body of undeclared length still owes its terminating chunk when exhausted:
    settling then would make the client wait on Redis for the end of its stream."""
    served = Served(app, environ_for("/ai/stream", **ai_json()))
    assert served.read_all(close=False) == b"".join(sse_body())
    assert events() == []  # exhausted: the server is still writing the last chunk
    served.close()
    [event] = events()  # settled by close(), once
    assert event["request_id"] == served.header("x-request-id")
    assert event["usage_source"] == "provider"
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("12", "34")
    assert event["cost"] == "0.0000222"
    assert event["client_disconnected"] == "false"
    assert quota_used("globex") == 46

    served.close()  # a second close() writes nothing more
    assert len(events()) == 1
    assert plain.bodies[0].closes == 2  # close() always reaches the app's body


def test_streamed_body_is_settled_once_at_close_after_exhaustion(
        app: AISaaSMiddleware, plain: PlainApp, events: Any) -> None:
    served = serve(app, "/ai/stream", **ai_json())
    assert served.read_all() == b"".join(sse_body())
    [event] = events()
    assert event["client_disconnected"] == "false"
    assert plain.bodies[0].closes == 1


def test_server_that_stops_iterating_early_settles_once_at_close(
        app: AISaaSMiddleware, plain: PlainApp, events: Any, quota_used: Any) -> None:
    served = serve(app, "/ai/stream", **ai_json())
    first = next(served.chunks)
    assert first == sse_body()[0]
    assert events() == []  # nothing settled while the response is under way
    served.close()  # what a server does when the client went away
    assert plain.bodies[0].closes == 1

    [event] = events()
    assert event["client_disconnected"] == "true"
    assert event["usage_source"] == "estimate" and event["status"] == "200"
    assert int(event["prompt_tokens"]) == estimate_prompt_tokens(CHAT)
    assert int(event["completion_tokens"]) == estimate_tokens(len(SSE_WORDS[0]))
    assert quota_used("globex") == int(event["prompt_tokens"]) + int(event["completion_tokens"])


def test_body_closed_before_any_chunk_is_settled_once(app: AISaaSMiddleware,
                                                      events: Any) -> None:
    served = serve(app, "/ai/stream", **ai_json())
    served.close()
    [event] = events()
    assert event["client_disconnected"] == "true"
    assert event["completion_tokens"] == "0"


def test_legacy_write_callable_output_is_metered(app: AISaaSMiddleware,
                                                 events: Any) -> None:
    served = serve(app, "/ai/write", **ai_json())
    assert served.read_all() == b"".join(sse_body())
    [event] = events()
    assert event["usage_source"] == "provider"
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("12", "34")


def test_app_that_raises_releases_its_reservation(app: AISaaSMiddleware, events: Any,
                                                  quota_used: Any) -> None:
    with pytest.raises(RuntimeError, match="has a bug"):
        Served(app, environ_for("/ai/boom", **ai_json()))
    [event] = events()
    assert event["status"] == "500"
    assert (event["prompt_tokens"], event["completion_tokens"], event["cost"]) == \
        ("0", "0", "0")
    assert quota_used("globex") == 0
    assert serve(app, "/ai/chat", **ai_json()).done().code == 200  # still serving


def test_body_that_raises_half_way_is_settled_as_failed_once(
        app: AISaaSMiddleware, plain: PlainApp, events: Any) -> None:
    served = serve(app, "/ai/boom-mid-stream", **ai_json())
    assert next(served.chunks) == sse_body()[0]
    with pytest.raises(RuntimeError, match="stream broke"):
        next(served.chunks)
    served.close()
    [event] = events()
    assert event["client_disconnected"] == "false"  # it failed; the client did not leave
    assert event["usage_source"] == "estimate"
    assert int(event["completion_tokens"]) == estimate_tokens(len(SSE_WORDS[0]))
    assert plain.bodies[0].closes == 1


# ------------------------------------------------------------------ non-AI requests


def test_non_ai_requests_pass_untouched_with_no_redis_command(
        app: AISaaSMiddleware, plain: PlainApp, prefix_commands: PrefixCommands) -> None:
    assert serve(app, "/ai/chat", **ai_json()).read_all()  # pool open, scripts loaded
    before = prefix_commands.count()
    raw = bytes(range(256)) * (3 * 4096)  # 3 MiB: over the AI body limit
    for _ in range(3):
        environ = environ_for("/echo", body=raw, headers=bearer("globex"))
        stream = environ["wsgi.input"]
        served = Served(app, environ)
        assert served.body is plain.bodies[-1]  # the app's own body, not wrapped
        assert plain.seen[-1]["wsgi.input"] is stream  # the app reads the request itself
        assert "ai_saas" not in plain.seen[-1]
        assert served.read_all() == raw
        assert Served(app, environ_for("/", method="GET")).read_all() == b"home"
        assert Served(app, environ_for("/aix", method="GET")).code == 404
    assert prefix_commands.count() == before

    assert serve(app, "/ai/chat", **ai_json()).read_all()  # the measure does move
    assert prefix_commands.count() > before


def test_request_path_is_the_utf8_text_of_path_info(make_middleware: Callable[..., Any],
                                                    events: Any) -> None:
    assert request_path({"PATH_INFO": "/ai/caf\u00c3\u00a9"}) == "/ai/caf\u00e9"
    assert request_path({"PATH_INFO": "/ai/\u00ff"}) == "/ai/\u00ff"  # not UTF-8: as is
    assert request_path({}) == ""
    app = make_middleware(endpoints=[{"path": "/ai/r\u00e9sum\u00e9"}])
    wsgi_path = "/ai/r\u00e9sum\u00e9".encode().decode("latin-1")  # as a server passes it
    served = serve(app, wsgi_path, **ai_json())
    assert served.code == 404  # the plain app knows no such route; it was admitted:
    served.read_all()
    [event] = events()
    assert event["request_id"] == served.header("x-request-id")
    assert event["status"] == "404"


# ------------------------------------------------------------------ the usage app


def test_usage_app_answers_like_the_asgi_one(app: AISaaSMiddleware,
                                             make_config: Callable[..., dict[str, Any]],
                                             key_prefix: str) -> None:
    assert serve(app, "/ai/chat", **ai_json()).read_all()
    usage = UsageApp(app.gateway)
    served = serve(usage, "/usage", method="GET", headers=bearer("globex"))
    assert served.status == "200 OK"
    report = json.loads(served.read_all())
    assert report["tenant_id"] == "globex" and report["tokens_used"] == 46
    assert report["requests_last_minute"] == 1

    asgi_usage = admin_app(config=make_config())  # same prefix: the same figures
    with TestClient(asgi_usage) as client:
        for method, headers in (("GET", bearer("globex")), ("GET", {}), ("POST", {}),
                                ("GET", {"Authorization": "Bearer nope"})):
            asgi = client.request(method, "/usage", headers=headers)
            served = serve(usage, "/usage", method=method, headers=headers)
            assert served.code == asgi.status_code
            assert served.read_all() == asgi.content
            assert [(k, v) for k, v in served.headers] == \
                [(k.decode(), v.decode()) for k, v in asgi.headers.raw]


# ------------------------------------------------------------------ over real HTTP


def test_over_http_a_chunked_upload_is_replayed_and_a_stream_relayed(
        app: AISaaSMiddleware, events: Any) -> None:
    raw = json.dumps({**CHAT, "note": "uploaded in chunks"}).encode()

    def upload() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        yield from (raw[i:i + 10] for i in range(0, len(raw), 10))

    with serve_wsgi_in_thread(app) as server, httpx.Client(base_url=server.url) as client:
        echoed = client.post("/ai/echo", content=upload(),
                             headers={**bearer("globex"), "content-type": "application/json"})
        assert echoed.status_code == 200 and echoed.content == raw
        with client.stream("POST", "/ai/stream", json=CHAT, headers=bearer("globex")) as reply:
            assert reply.headers["content-type"] == SSE
            assert b"".join(reply.iter_raw()) == b"".join(sse_body())
    # By request id, not stream order: a chunked reply is settled when the server closes
    # it, after its last chunk went out, so the next request may settle first.
    assert {e["request_id"]: e["usage_source"] for e in events()} == {
        echoed.headers["x-request-id"]: "estimate", reply.headers["x-request-id"]: "provider"}


def test_over_http_a_client_that_hangs_up_mid_stream_is_billed_what_was_produced(
        app: AISaaSMiddleware, events: Any, quota_used: Any) -> None:
    body = json.dumps(CHAT).encode()
    with serve_wsgi_in_thread(app) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /ai/stream-stalls HTTP/1.1\r\nHost: test\r\n"
                         b"Content-Type: application/json\r\n"
                         + f"Authorization: Bearer {API_KEYS['globex']}\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            received = b""
            while received.count(b"data: ") < 3:  # the three content chunks
                received += sock.recv(65536)
        # The client is gone; the server's next write fails and it closes the body.
        deadline = time.monotonic() + 20
        while not events() and time.monotonic() < deadline:
            time.sleep(0.02)
    [event] = events()
    assert event["client_disconnected"] == "true"
    assert event["usage_source"] == "estimate" and event["status"] == "200"
    produced = estimate_tokens(len("".join(SSE_WORDS[:3])))
    assert int(event["completion_tokens"]) == produced
    assert quota_used("globex") == int(event["prompt_tokens"]) + produced


def test_gateway_is_sync_and_shared_when_given(make_config: Callable[..., dict[str, Any]],
                                               plain: PlainApp, events: Any) -> None:
    gateway = Gateway(load_config(make_config()))
    first = AISaaSMiddleware(plain, gateway=gateway)
    second = AISaaSMiddleware(plain, gateway=gateway)
    assert first.gateway is second.gateway is gateway
    with pytest.raises(TypeError, match="config="):
        AISaaSMiddleware(plain)
    assert serve(first, "/ai/chat", **ai_json()).done().code == 200
    assert serve(second, "/ai/chat", **ai_json()).done().code == 200
    assert len(events()) == 2
    gateway.close()


def test_a_handler_that_runs_out_of_models_gets_the_503_not_a_500(
        app: AISaaSMiddleware, events: Any) -> None:
    served = serve(app, "/ai/all-down", **ai_json())
    body = served.read_all()
    assert served.status.startswith("503"), served.status
    assert json.loads(body)["error"]["code"] == "no_healthy_model"
    headers = dict((k.lower(), v) for k, v in served.headers)
    assert "retry-after" in headers and "x-request-id" in headers
    (event,) = events()
    assert (event["status"], event["prompt_tokens"], event["cost"]) == ("503", "0", "0")
