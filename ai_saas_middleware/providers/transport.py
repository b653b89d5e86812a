"""HTTP for the providers: urllib3 for sync calls, aiohttp for async ones.

Chosen by measurement on the project's machine (benchmarks/README.md, "Issue 9: provider
layer"): for a small JSON reply from a loopback stand-in, CPU per request at 1 / 16 / 64
concurrent requests was aiohttp 0.41 / 0.30 / 0.42 ms against httpx's AsyncClient 1.85
/ 4.12 / 6.64 ms, and urllib3 0.40 / 0.57 / 0.59 ms (threads) against httpx's Client
0.86 / 1.26 / 1.31 ms. Both are imported on first use, so the package imports without
them; a missing one raises an ImportError naming ``ai-saas-middleware[providers]``.

This is the one place library exceptions are translated: everything leaving here is a
:class:`~ai_saas_middleware.providers.base.ProviderError` (timeouts ``ProviderTimeout``,
everything else on the wire ``ProviderConnectionError``). Status codes are not judged
here: the caller reads them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from .base import ProviderConnectionError, ProviderError, ProviderTimeout

__all__ = ["AsyncTransport", "SyncTransport", "require"]

log = logging.getLogger("ai_saas_middleware")

_EXTRA = "pip install 'ai-saas-middleware[providers]'"
_READ_CHUNK = 65536


def require(module: str) -> Any:
    """Import ``module`` (``urllib3`` or ``aiohttp``) or say which extra brings it."""
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(f"the provider layer needs {module}: {_EXTRA}") from exc


class SyncTransport:
    """A pool of connections to one provider, for threads (urllib3)."""

    def __init__(self, base_url: str, *, provider: str, headers: Mapping[str, str],
                 connect_timeout_s: float, read_timeout_s: float, max_connections: int
                 ) -> None:
        urllib3 = require("urllib3")
        self._exc = urllib3.exceptions
        self.provider = provider
        self._connect_s = connect_timeout_s
        self._read_s = read_timeout_s
        self._manager = urllib3.PoolManager(
            num_pools=1, maxsize=max_connections, block=False, retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s))
        self._pool = self._manager.connection_from_url(base_url)
        self._headers = dict(headers)
        self._prefix = urllib3.util.parse_url(base_url).path or ""

    def post(self, path: str, body: bytes, model: str
             ) -> tuple[int, Mapping[str, str], bytes]:
        """POST (with the provider's headers) and read the whole reply: (status, headers,
        body)."""
        try:
            resp = self._pool.urlopen("POST", self._prefix + path, body=body,
                                      headers=self._headers, retries=False, redirect=False,
                                      preload_content=True)
        except Exception as exc:
            raise self._translate(exc, model) from exc
        return resp.status, resp.headers, resp.data

    def open(self, path: str, body: bytes, model: str) -> Any:
        """POST and return the unread response (read it with :meth:`chunks`)."""
        try:
            return self._pool.urlopen("POST", self._prefix + path, body=body,
                                      headers=self._headers, retries=False, redirect=False,
                                      preload_content=False)
        except Exception as exc:
            raise self._translate(exc, model) from exc

    def chunks(self, resp: Any, model: str) -> Iterator[bytes]:
        """The body's bytes as they arrive."""
        reader = resp.read_chunked() if resp.chunked else iter(
            lambda: resp.read1(_READ_CHUNK), b"")
        while True:
            try:
                chunk = next(reader, None)
            except Exception as exc:
                raise self._translate(exc, model) from exc
            if chunk is None:
                return
            if chunk:
                yield chunk

    def read_rest(self, resp: Any, model: str) -> bytes:
        try:
            return bytes(resp.read())
        except Exception as exc:
            raise self._translate(exc, model) from exc

    @staticmethod
    def release(resp: Any, finished: bool) -> None:
        """Give the connection back; one with unread bytes is closed first."""
        if not finished:
            resp.close()
        resp.release_conn()

    def _translate(self, exc: BaseException, model: str) -> ProviderError:
        e = self._exc
        if isinstance(exc, ProviderError):
            return exc
        # NewConnectionError is a ConnectTimeoutError in urllib3's tree: test it first.
        if isinstance(exc, e.NewConnectionError):
            kind: type[ProviderError] = ProviderConnectionError
            what = f"could not connect ({_reason(exc)})"
        elif isinstance(exc, e.ConnectTimeoutError):
            kind, what = ProviderTimeout, f"no connection within {self._connect_s:g}s"
        elif isinstance(exc, (e.ReadTimeoutError, TimeoutError)):
            kind, what = ProviderTimeout, f"no reply bytes within {self._read_s:g}s"
        else:
            kind, what = ProviderConnectionError, f"the connection broke ({_reason(exc)})"
        return _error(kind, self.provider, model, what)

    def close(self) -> None:
        self._manager.clear()


class AsyncTransport:
    """A pool of connections to one provider, for one event loop at a time (aiohttp).

    aiohttp's session belongs to the loop it was made on: the session is made on first
    use, and again when a call comes from another loop (a test's new loop, a server
    restarted in-process).

    Per request it does no more than it must (benchmarks/README.md, "Issue 9: provider
    layer"): the provider's headers are the session's defaults (merged once per request
    by aiohttp, not converted from a dict), and each path's URL is parsed once."""

    def __init__(self, base_url: str, *, provider: str, headers: Mapping[str, str],
                 connect_timeout_s: float, read_timeout_s: float, max_connections: int
                 ) -> None:
        self._aiohttp = require("aiohttp")
        self._URL = require("yarl").URL  # aiohttp's own URL type (a dependency of it)
        self.provider = provider
        self._base_url = base_url
        self._headers = dict(headers)
        self._urls: dict[str, Any] = {}  # path -> yarl.URL
        self._connect_s = connect_timeout_s
        self._read_s = read_timeout_s
        self._max_connections = max_connections
        self._session: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _current(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            aiohttp = self._aiohttp
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_s,
                                              sock_read=self._read_s),
                headers=self._headers, auto_decompress=True, raise_for_status=False)
            self._loop = loop
        return self._session

    def _url(self, path: str) -> Any:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = self._URL(self._base_url + path)
        return url

    async def post(self, path: str, body: bytes, model: str
                   ) -> tuple[int, Mapping[str, str], bytes]:
        """POST (with the provider's headers) and read the whole reply: (status, headers,
        body)."""
        try:
            async with self._current().post(self._url(path), data=body,
                                            allow_redirects=False) as resp:
                return resp.status, resp.headers, await resp.read()
        except Exception as exc:
            raise self._translate(exc, model) from exc

    async def open(self, path: str, body: bytes, model: str) -> Any:
        """POST and return the unread response (read it with :meth:`chunks`)."""
        try:
            return await self._current().post(self._url(path), data=body,
                                              allow_redirects=False)
        except Exception as exc:
            raise self._translate(exc, model) from exc

    async def chunks(self, resp: Any, model: str) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive."""
        while True:
            try:
                chunk = await resp.content.readany()
            except Exception as exc:
                raise self._translate(exc, model) from exc
            if not chunk:
                return
            yield chunk

    async def read_rest(self, resp: Any, model: str) -> bytes:
        try:
            return bytes(await resp.read())
        except Exception as exc:
            raise self._translate(exc, model) from exc

    @staticmethod
    def release(resp: Any, finished: bool) -> None:
        """Give the connection back; one with unread bytes is closed."""
        if finished:
            resp.release()
        else:
            resp.close()

    def _translate(self, exc: BaseException, model: str) -> ProviderError:
        if isinstance(exc, ProviderError):
            return exc
        aiohttp = self._aiohttp
        if isinstance(exc, asyncio.TimeoutError) or isinstance(exc, TimeoutError):
            connect = isinstance(exc, getattr(aiohttp, "ConnectionTimeoutError", ()))
            kind: type[ProviderError] = ProviderTimeout
            what = (f"no connection within {self._connect_s:g}s" if connect
                    else f"no reply bytes within {self._read_s:g}s")
        elif isinstance(exc, aiohttp.ClientConnectorError):
            kind, what = ProviderConnectionError, f"could not connect ({_reason(exc)})"
        else:
            kind, what = ProviderConnectionError, f"the connection broke ({_reason(exc)})"
        return _error(kind, self.provider, model, what)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed and self._loop is asyncio.get_running_loop():
            await session.close()


def _reason(exc: BaseException) -> str:
    # The exception's class and its first line: enough to tell refused from reset, and
    # never a header (no library puts request headers in these messages).
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _error(kind: type[ProviderError], provider: str, model: str, what: str) -> ProviderError:
    error = kind(f"{provider}: calling {model}: {what}", provider=provider, model=model)
    log.debug("provider %s, model %s: %s", provider, model, what)
    return error
