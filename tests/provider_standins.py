"""Stand-in provider servers: real HTTP/1.1 on loopback speaking the OpenAI chat
completions API and Anthropic's Messages API, whole and streamed (SSE).

One asyncio server (its own thread, or its own process for the benchmark) serves both
APIs: ``POST /chat/completions`` (OpenAI-compatible) and ``POST /v1/messages``
(Anthropic). What a request gets is chosen by its ``model``, so one server plays every
scenario a test needs:

==================  ===========================================================
``model``           reply
==================  ===========================================================
anything else       200, ``"Hello from <model>"``; usage: prompt tokens = words of
                    the messages (system included), completion tokens = 4
``status-NNN``      status NNN with the API's error JSON body (401: its message quotes
                    the key received, as OpenAI's does, so redaction can be tested)
``malformed``       200 with a body that is not JSON (a stream: a ``data:`` line
                    that is not JSON)
``hang``            reads the request, never answers (until the server stops)
``slow-stream``     a stream whose chunks are spaced ``SLOW_GAP_S`` apart
``cut-stream``      a stream that sends two text deltas, then drops the connection
``stream-error``    (Anthropic) a stream with an ``error`` event after one delta
==================  ===========================================================

A model listed in :attr:`StandIn.failing` gets 503s until it is removed (a model that
goes down and recovers); :meth:`StandIn.calls` counts the requests that named a model.

Every request's path, headers and JSON body are kept in :attr:`StandIn.requests`, so a
test can see what reached the provider (the API key header, ``stream_options``).

Run alone (the benchmark does): ``python tests/provider_standins.py PORT``; it prints
``ready`` once listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

DELTAS = ("Hello", " from", " ", "{model}")
SLOW_GAP_S = 0.15
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass
class Received:
    """One request as the stand-in saw it."""

    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class StandIn:
    """A running stand-in server (see the module docstring)."""

    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Received] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _server: asyncio.base_events.Server | None = None
    _thread: threading.Thread | None = None
    _hanging: set[asyncio.StreamWriter] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    failing: set[str] = field(default_factory=set)  # models answered 503 while listed here

    def calls(self, model: str) -> int:
        """How many requests named ``model`` so far."""
        with self._lock:
            return sum(1 for r in self.requests
                       if isinstance(r.body, dict) and r.body.get("model") == model)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> StandIn:
        """Serve from a thread of its own; returns once listening."""
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve, self.host, self.port, backlog=512))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="provider-standin", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._hanging):
            writer.close()
        # Cancel every connection handler still running (a hanging one, an idle keep-alive).
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def last(self) -> Received:
        with self._lock:
            return self.requests[-1]

    # -- HTTP/1.1, the least of it: keep-alive, Content-Length bodies, chunked replies

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                _method, path, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                with self._lock:
                    self.requests.append(Received(path, headers, body))
                if not await self._answer(path, headers, body, writer):
                    return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, path: str, headers: dict[str, str], body: Any,
                      writer: asyncio.StreamWriter) -> bool:
        """Write one reply; False when the connection must end."""
        anthropic = path.endswith("/v1/messages")
        if not isinstance(body, dict) or not (anthropic or path.endswith("/chat/completions")):
            self._whole(writer, 404, {"error": {"message": "not found"}})
            await writer.drain()
            return True
        model = str(body.get("model", ""))
        if model in self.failing:
            model = "status-503"
        if model.startswith("status-"):
            status = int(model[len("status-"):])
            message = "boom"
            if status == 401:
                key = headers.get("x-api-key") or headers.get("authorization", "")
                message = f"Incorrect API key provided: {key.removeprefix('Bearer ')}"
            error = ({"type": "error", "error": {"type": "api_error", "message": message}}
                     if anthropic else {"error": {"message": message, "type": "server_error"}})
            self._whole(writer, status, error, {"Retry-After": "7"} if status == 429 else None)
        elif model == "hang":
            self._hanging.add(writer)
            await asyncio.Event().wait()  # until the server stops (cancelled)
        elif not body.get("stream"):
            if model == "malformed":
                self._raw(writer, 200, b"{not json", "application/json")
            else:
                self._whole(writer, 200, _anthropic_whole(body) if anthropic
                            else _openai_whole(body))
        else:
            return await self._stream(writer, body, anthropic)
        await writer.drain()
        return True

    def _whole(self, writer: asyncio.StreamWriter, status: int, payload: Any,
               extra: dict[str, str] | None = None) -> None:
        self._raw(writer, status, json.dumps(payload).encode(), "application/json", extra)

    @staticmethod
    def _raw(writer: asyncio.StreamWriter, status: int, data: bytes, ctype: str,
             extra: dict[str, str] | None = None) -> None:
        more = "".join(f"{k}: {v}\r\n" for k, v in (extra or {}).items())
        writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
                     f"Content-Type: {ctype}\r\nContent-Length: {len(data)}\r\n{more}\r\n"
                     .encode() + data)

    async def _stream(self, writer: asyncio.StreamWriter, body: dict[str, Any],
                      anthropic: bool) -> bool:
        model = str(body.get("model"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        events = _anthropic_events(body) if anthropic else _openai_events(body)
        # cut-stream: the connection drops after two text deltas (OpenAI: after the role
        # chunk and two deltas; Anthropic: after message_start, content_block_start, ping).
        cut_at = 5 if anthropic else 3
        for i, event in enumerate(events):
            if model == "cut-stream" and i == cut_at:
                await writer.drain()
                # Drop the connection mid-answer, without the chunked terminator.
                transport = writer.transport
                transport.abort()
                return False
            if model == "slow-stream" and i:
                await asyncio.sleep(SLOW_GAP_S)
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


def _prompt_tokens(body: dict[str, Any]) -> int:
    words = 0
    system = body.get("system")
    if isinstance(system, str):
        words += len(system.split())
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            words += len(content.split())
    return words


def _text(body: dict[str, Any]) -> list[str]:
    return [d.format(model=body.get("model")) for d in DELTAS]


def _openai_whole(body: dict[str, Any]) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "".join(_text(body))}}],
            "usage": {"prompt_tokens": _prompt_tokens(body), "completion_tokens": len(DELTAS),
                      "total_tokens": _prompt_tokens(body) + len(DELTAS)}}


def _sse(payload: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


def _openai_events(body: dict[str, Any]) -> list[bytes]:
    model = body.get("model")
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model}
    out = [_sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})]
    for piece in _text(body):
        out.append(_sse({**chunk, "choices": [{"index": 0, "delta": {"content": piece}}]}))
    if model == "malformed":
        out.append(b"data: {not json\n\n")
    out.append(_sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    if (body.get("stream_options") or {}).get("include_usage"):
        out.append(_sse({**chunk, "choices": [], "usage": {
            "prompt_tokens": _prompt_tokens(body), "completion_tokens": len(DELTAS),
            "total_tokens": _prompt_tokens(body) + len(DELTAS)}}))
    out.append(b"data: [DONE]\n\n")
    return out


def _anthropic_whole(body: dict[str, Any]) -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": body.get("model"),
            "content": [{"type": "text", "text": "".join(_text(body))}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": _prompt_tokens(body), "output_tokens": len(DELTAS)}}


def _anthropic_events(body: dict[str, Any]) -> list[bytes]:
    model = body.get("model")
    out = [_sse({"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "usage": {"input_tokens": _prompt_tokens(body),
                                       "output_tokens": 1}}}, "message_start"),
           _sse({"type": "content_block_start", "index": 0,
                 "content_block": {"type": "text", "text": ""}}, "content_block_start"),
           _sse({"type": "ping"}, "ping")]
    for i, piece in enumerate(_text(body)):
        out.append(_sse({"type": "content_block_delta", "index": 0,
                         "delta": {"type": "text_delta", "text": piece}},
                        "content_block_delta"))
        if model == "stream-error" and i == 0:
            out.append(_sse({"type": "error", "error": {"type": "overloaded_error",
                                                        "message": "Overloaded"}}, "error"))
            return out
    if model == "malformed":
        out.append(b"event: content_block_delta\ndata: {not json\n\n")
    out += [_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                  "usage": {"output_tokens": len(DELTAS)}}, "message_delta"),
            _sse({"type": "message_stop"}, "message_stop")]
    return out


def main(argv: list[str]) -> None:
    """Serve on ``argv[0]`` (a port) in this process until killed; print ``ready``."""
    standin = StandIn(port=int(argv[0]) if argv else 0)
    standin.requests = _Discard()  # a benchmark's millions of requests are not kept
    standin.start()
    print(f"ready {standin.port}", flush=True)
    threading.Event().wait()


class _Discard(list):  # type: ignore[type-arg]
    def append(self, item: Any) -> None:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
