"""The one place that talks to Redis.

Two twins with the same method names: :class:`RedisStore` (redis-py, for WSGI apps,
workers and the CLI) and :class:`AsyncRedisStore` (``redis.asyncio``, for ASGI apps: a
sync client would block the event loop). Both pool connections, use short timeouts,
run the Lua scripts by SHA (redis-py's ``register_script`` reloads on NOSCRIPT) and
translate every driver error into :class:`~ai_saas_middleware.errors.StoreError`.

On the ASGI hot path the asyncio store sends the scripts down one connection of its own
(a :class:`_Lane`), not through the pool: checking a connection out of redis-py's
asyncio pool, and its per-operation timeouts, cost more than the round trip itself, and
concurrent requests' scripts share one write and one read instead of one each.

An unreachable Redis is not retried on every request: after a connection failure the
store answers ``StoreError`` at once for ``retry_interval_s``, then tries again.

URLs: ``redis://``, ``rediss://``, ``unix://`` for one server, and
``redis+cluster://host:port`` (or ``rediss+cluster://``) for a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import copy
import sys
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config import RedisConfig
from ..errors import StoreError, StoreRefused

try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is optional (the 'all' extra)
    _hiredis_pack = None  # type: ignore[assignment]

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # pragma: no cover - redis-py requires async-timeout before 3.11.3
    from async_timeout import timeout as _timeout

__all__ = ["AsyncRedisStore", "RedisStore", "load_script"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def load_script(name: str) -> str:
    """The source of ``store/lua/<name>.lua``."""
    return resources.files(__package__).joinpath("lua").joinpath(f"{name}.lua").read_text("utf-8")


_ADMIT = load_script("admit")
_SETTLE = load_script("settle")
_USAGE = load_script("usage")


def _retry_args(which: str, args: Sequence[Any]) -> Sequence[Any]:
    return [*args, "retry"] if which == "admit" else args


def _split_url(url: str) -> tuple[bool, str]:
    for scheme in ("redis+cluster://", "rediss+cluster://"):
        if url.startswith(scheme):
            return True, url.replace("+cluster", "", 1)
    return False, url


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


class _Health:
    """Remembers a failure so an unreachable Redis is not dialled on every request."""

    def __init__(self, cfg: RedisConfig, url: str):
        self.retry_interval_s = cfg.retry_interval_s
        self.url = _redact(url)
        self.down_until = 0.0
        self.last_error = ""

    def check(self) -> None:
        if self.down_until and time.monotonic() < self.down_until:
            raise StoreError(f"Redis at {self.url} is unavailable ({self.last_error}); "
                             f"not retried for {self.retry_interval_s:g}s")

    def failed(self, exc: BaseException) -> StoreError:
        from redis.exceptions import ConnectionError as RConnectionError
        from redis.exceptions import TimeoutError as RTimeoutError

        self.last_error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (RConnectionError, RTimeoutError, OSError, asyncio.TimeoutError)):
            self.down_until = time.monotonic() + self.retry_interval_s
        return StoreError(f"Redis at {self.url}: {self.last_error}")

    def ok(self) -> None:
        self.down_until = 0.0

    def is_down(self) -> bool:
        return bool(self.down_until) and time.monotonic() < self.down_until


def _client_kwargs(cfg: RedisConfig) -> dict[str, Any]:
    return {
        "socket_timeout": cfg.socket_timeout_s,
        "socket_connect_timeout": cfg.connect_timeout_s,
        "decode_responses": False,
        "health_check_interval": 0,
    }


class RedisStore:
    """Synchronous store over redis-py.

    Args:
        cfg: the ``redis`` section of the configuration.
        url: overrides ``cfg.url`` (else ``REDIS_URL`` is the caller's business).
    """

    def __init__(self, cfg: RedisConfig, url: str | None = None):
        self.url = url or cfg.url or DEFAULT_URL
        self.cluster, plain = _split_url(self.url)
        kwargs = _client_kwargs(cfg)
        if self.cluster:
            self.client: Any = redis.cluster.RedisCluster.from_url(plain, **kwargs)
        else:
            self.client = redis.Redis.from_url(plain, **kwargs)
        self.health = _Health(cfg, self.url)
        self._admit = self.client.register_script(_ADMIT)
        self._settle = self.client.register_script(_SETTLE)
        self._usage = self.client.register_script(_USAGE)
        self._loaded = False

    def _load_scripts(self) -> None:
        # Once per client, so that concurrent first requests do not all meet NOSCRIPT.
        # Script objects still reload on NOSCRIPT (a SCRIPT FLUSH, a failover).
        if not self.cluster:
            self.client.script_load(_ADMIT)
            self.client.script_load(_SETTLE)
        self._loaded = True

    def _run(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        self.health.check()
        try:
            if not self._loaded:
                self._load_scripts()
            result = script(keys=keys, args=args)
        except ResponseError as exc:
            raise StoreRefused(f"Redis refused a script: {exc}") from exc
        except (RedisError, OSError) as exc:
            raise self.health.failed(exc) from exc
        self.health.ok()
        return result

    def admit(self, keys: Sequence[str], args: Sequence[Any]) -> list[Any]:
        """Run admit.lua; see its header for KEYS, ARGV and the reply."""
        return list(self._run(self._admit, keys, args))

    def settle(self, keys: Sequence[str], args: Sequence[Any]) -> bytes | None:
        """Run settle.lua; returns the stream entry id, or None if already settled."""
        return self._run(self._settle, keys, args)  # type: ignore[no-any-return]

    def usage(self, keys: Sequence[str], args: Sequence[Any]) -> list[Any]:
        """Run usage.lua (a tenant's own usage endpoint)."""
        return list(self._run(self._usage, keys, args))

    def call(self, *command: Any) -> Any:
        """Run one plain command (admin paths only, never the request path)."""
        self.health.check()
        try:
            result = self.client.execute_command(*command)
        except ResponseError as exc:
            raise StoreRefused(f"Redis refused {command[0]}: {exc}") from exc
        except (RedisError, OSError) as exc:
            raise self.health.failed(exc) from exc
        self.health.ok()
        return result

    def close(self) -> None:
        self.client.close()


class _Lane:
    """One connection that carries the hot-path scripts of one event loop, pipelined.

    A call made while the lane is idle is written and read by its own task at once: no
    extra hop, no pool checkout, one timeout around the exchange. Calls made while the
    lane is busy wait in a queue, and the task that frees the lane hands the queue to a
    drain task, which writes all of them in one go and reads their replies in order.
    Under load, N concurrent scripts then cost one write and one wake-up instead of N;
    each call is still its own EVALSHA, answered in the round trip it was sent in.

    Only the task that sends a lone call can be cancelled mid-exchange (a batch belongs
    to the drain task), so a cancelled request never fails another request's call.
    """

    def __init__(self, pool: Any, cfg: RedisConfig):
        self._pool = pool
        self._socket_timeout_s = cfg.socket_timeout_s
        self._connect_timeout_s = cfg.connect_timeout_s
        self._conn: Any = None
        self._queue: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._busy = False
        self._drainer: asyncio.Future[None] | None = None
        self._packer: Any = None  # a never-connected connection, for its packer

    def pack(self, *args: Any) -> bytes:
        """One command in RESP, as redis-py would write it (hiredis's packer when present)."""
        if _hiredis_pack is not None:
            try:
                return _hiredis_pack(args)  # type: ignore[no-any-return]
            except TypeError:
                pass  # an odd argument: let redis-py's packer say what is wrong with it
        if self._packer is None:
            self._packer = self._pool.make_connection()
        return b"".join(self._packer.pack_command(*args))

    async def call(self, command: bytes) -> Any:
        """Send one packed command; its reply, or the ResponseError Redis answered."""
        if self._busy:
            future = asyncio.get_running_loop().create_future()
            self._queue.append((command, future))
            return await future
        self._busy = True
        try:
            reply = (await self._exchange([command]))[0]
        finally:
            if self._queue:
                self._drainer = asyncio.ensure_future(self._drain())
            else:
                self._busy = False
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def _drain(self) -> None:
        try:
            while self._queue:
                # A caller that went away while queued (cancelled) is not sent at all.
                batch = [(command, future) for command, future in self._queue
                         if not future.done()]
                self._queue = []
                if not batch:
                    continue
                try:
                    replies = await self._exchange([command for command, _ in batch])
                except BaseException as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(copy.copy(exc) if isinstance(exc, Exception)
                                                 else RedisConnectionError("cancelled"))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), reply in zip(batch, replies, strict=True):
                    if future.done():  # its caller went away; the reply is dropped
                        continue
                    if isinstance(reply, ResponseError):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        finally:
            for _, future in self._queue:  # only when the loop is shutting down
                if not future.done():
                    future.set_exception(RedisConnectionError("cancelled"))
            self._queue = []
            self._busy = False
            self._drainer = None

    async def _exchange(self, commands: list[bytes]) -> list[Any]:
        """Write ``commands`` at once, read their replies in order (errors as values)."""
        conn = self._conn
        if conn is None:
            conn = self._conn = self._pool.make_connection()
        limit = self._socket_timeout_s
        if not conn.is_connected:
            limit += self._connect_timeout_s
        try:
            async with _timeout(limit):
                await conn.send_packed_command(commands, check_health=False)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await conn.read_response())
                    except ResponseError as exc:
                        replies.append(exc)
                return replies
        except BaseException as exc:
            # The connection's state is unknown (a reply may be half read): drop it.
            self._conn = None
            await conn.disconnect(nowait=True)
            if isinstance(exc, asyncio.TimeoutError):
                raise RedisTimeoutError(f"no reply from Redis within {limit:g}s") from None
            raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect()


class AsyncRedisStore:
    """Asyncio twin of :class:`RedisStore` over ``redis.asyncio``.

    A client belongs to the event loop it first ran on; when called from another loop
    (a test client that starts one loop per request, a second thread) the store makes
    a client for that loop instead of failing.
    """

    def __init__(self, cfg: RedisConfig, url: str | None = None):
        self.cfg = cfg
        self.url = url or cfg.url or DEFAULT_URL
        self.cluster, self._plain = _split_url(self.url)
        self.health = _Health(cfg, self.url)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._admit: Any = None
        self._settle: Any = None
        self._usage: Any = None
        self._loading: asyncio.Future[None] | None = None
        self._lane: _Lane | None = None

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        kwargs = _client_kwargs(self.cfg)
        if self.cluster:
            client: Any = redis.asyncio.cluster.RedisCluster.from_url(self._plain, **kwargs)
        else:
            client = redis.asyncio.Redis.from_url(self._plain, **kwargs)
        self._client, self._loop = client, loop
        self._admit = client.register_script(_ADMIT)
        self._settle = client.register_script(_SETTLE)
        self._usage = client.register_script(_USAGE)
        self._loading = None
        self._lane = None
        if not self.cluster:  # a cluster client routes each script to its slot's node
            # No socket timeout on the lane's connection: redis-py would wrap every send
            # and read in one (a task per send before Python 3.12); the lane bounds the
            # whole exchange instead.
            kwargs["socket_timeout"] = None
            self._lane = _Lane(redis.asyncio.ConnectionPool.from_url(self._plain, **kwargs),
                               self.cfg)

    async def _load_scripts(self) -> None:
        """SCRIPT LOAD once per client; concurrent first requests wait for the one load."""
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._do_load(self._client))
        try:
            await asyncio.shield(self._loading)
        except BaseException:
            self._loading = None
            raise

    async def _do_load(self, client: Any) -> None:
        if not self.cluster:
            await client.script_load(_ADMIT)
            await client.script_load(_SETTLE)

    @property
    def client(self) -> Any:
        self._bind()
        return self._client

    async def _run(self, which: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        self.health.check()
        if self._loop is not asyncio.get_running_loop():
            self._bind()
        script = (self._admit if which == "admit" else
                  self._settle if which == "settle" else self._usage)
        try:
            if self._loading is None or not self._loading.done():
                await self._load_scripts()
            try:
                result = await self._evalsha(script, keys, args)
            except RedisConnectionError:
                # A pooled connection the server closed (a restart, a failover) fails on
                # first use: redis-py's sync pool notices at checkout, the asyncio pool does
                # not. One immediate retry on a fresh connection keeps the twins alike
                # (a timeout is not retried: that would double the wait on a hung server).
                # The retry is safe: settle.lua dedupes by request id, and admit.lua, told
                # it is a retry, does not count an attempt that did run twice.
                result = await self._evalsha(script, keys, _retry_args(which, args))
        except ResponseError as exc:
            raise StoreRefused(f"Redis refused a script: {exc}") from exc
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise self.health.failed(exc) from exc
        self.health.ok()
        return result

    async def _evalsha(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        lane = self._lane
        if lane is None:
            return await script(keys=keys, args=args)
        try:
            return await lane.call(lane.pack("EVALSHA", script.sha, len(keys), *keys, *args))
        except NoScriptError:  # a SCRIPT FLUSH, a restart: load it, as redis-py's Script does
            sha = await lane.call(lane.pack("SCRIPT", "LOAD", script.script))
            script.sha = sha.decode() if isinstance(sha, bytes) else sha
            return await lane.call(lane.pack("EVALSHA", script.sha, len(keys), *keys, *args))

    async def admit(self, keys: Sequence[str], args: Sequence[Any]) -> list[Any]:
        return list(await self._run("admit", keys, args))

    async def settle(self, keys: Sequence[str], args: Sequence[Any]) -> bytes | None:
        return await self._run("settle", keys, args)  # type: ignore[no-any-return]

    async def usage(self, keys: Sequence[str], args: Sequence[Any]) -> list[Any]:
        return list(await self._run("usage", keys, args))

    async def call(self, *command: Any) -> Any:
        self.health.check()
        try:
            result = await self.client.execute_command(*command)
        except ResponseError as exc:
            raise StoreRefused(f"Redis refused {command[0]}: {exc}") from exc
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise self.health.failed(exc) from exc
        self.health.ok()
        return result

    async def close(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            if self._lane is not None:
                await self._lane.close()
            await self._client.aclose()
        self._client = self._loop = None
        self._lane = None
