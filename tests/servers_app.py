"""The WSGI app of ``tests/test_servers.py``, served in process or by a gunicorn worker.

``gunicorn servers_app:app`` builds it from the JSON file named by ``AI_SAAS_SERVERS_APP``
(``{"config": <the middleware's config>, "signals": <a folder>}``), so the test and the
worker process share the folder: the worker writes ``produced`` there (how many content
chunks it handed to the server), and waits for the test to write ``hung-up`` there.

The one endpoint streams OpenAI-style chunks as server-sent events, each chunk's content
``WORD`` (one estimated token), then a usage chunk and ``[DONE]``:

- ``POST /ai/stream/waits``: after the first chunk it waits for ``hung-up`` (the client
  has gone), so that the server's next write fails: a hang-up mid-stream, every time;
- ``POST /ai/stream/whole``: the whole stream at once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ai_saas_middleware.wsgi import AISaaSMiddleware

CONFIG_ENV = "AI_SAAS_SERVERS_APP"
CHUNKS = 40
WORD = "tok "  # 4 characters: one token by the middleware's estimate
HUNG_UP, PRODUCED = "hung-up", "produced"


def _sse(payload: Any) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.005)


def _chunks(signals: Path, wait: bool) -> Iterator[bytes]:
    produced = 0
    try:
        for i in range(CHUNKS):
            produced += 1
            yield _sse({"object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": {"content": WORD}}]})
            if wait and i == 0:
                _wait_for(signals / HUNG_UP)
        yield _sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": CHUNKS,
                                             "total_tokens": 7 + CHUNKS}})
        yield b"data: [DONE]\n\n"
    finally:  # also when the server closed the body after the client went away
        (signals / PRODUCED).write_text(str(produced))


def make_app(config: dict[str, Any], signals: Path) -> AISaaSMiddleware:
    """The streaming app behind the middleware; ``signals`` is the shared folder."""

    def stream(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        return _chunks(signals, wait=environ.get("PATH_INFO") == "/ai/stream/waits")

    return AISaaSMiddleware(stream, config=config)


def _from_env() -> AISaaSMiddleware | None:
    source = os.environ.get(CONFIG_ENV)
    if not source:
        return None
    spec = json.loads(Path(source).read_text())
    return make_app(spec["config"], Path(spec["signals"]))


app = _from_env()  # what a gunicorn worker imports
