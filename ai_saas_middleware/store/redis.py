"""The one place that talks to Redis.

Two twins with the same method names: :class:`RedisStore` (redis-py, for WSGI apps,
workers and the CLI) and :class:`AsyncRedisStore` (``redis.asyncio``, for ASGI apps: a
sync client would block the event loop). Both pool connections, use short timeouts,
run the Lua scripts by SHA (redis-py's ``register_script`` reloads on NOSCRIPT) and
translate every driver error into :class:`~ai_saas_middleware.errors.StoreError`.

On the ASGI hot path the asyncio store sends the scripts down one connection of its own
(a :class:`_Lane`), not through the pool: checking a connection out of redis-py's
asyncio pool, and its per-operation timeouts, cost more than the round trip itself, and
concurrent requests' scripts share one write and one read instead of one each. The sync
store, for the same reason, sends them down connections of its own (a :class:`_SyncLane`)
rather than through redis-py's ``Script`` and pool.

An unreachable Redis is not retried on every request: after a connection failure, or an
error reply that means "not now" (READONLY, OOM, LOADING, BUSY ...: see
:mod:`~ai_saas_middleware.store.replies`, the one classification of both stores), the
store answers ``StoreError`` at once for ``retry_interval_s``, then tries again. Only a
reply that can never succeed is :class:`~ai_saas_middleware.errors.StoreRefused`.

TLS (``rediss://``): both stores honour the URL's ``ssl_ca_certs``, ``ssl_ca_path``,
``ssl_ca_data``, ``ssl_certfile``/``ssl_keyfile``/``ssl_password`` (a client certificate),
``ssl_cert_reqs`` (none | optional | required), ``ssl_check_hostname``, ``ssl_ciphers``
and ``ssl_min_version``, exactly as redis-py's ``SSLConnection`` does.

A password in the URL (``user:pass@``, ``?password=``) never reaches a message or a log
line: :func:`_redact`.

URLs: ``redis://``, ``rediss://``, ``unix://`` for one server, and
``redis+cluster://host:port`` (or ``rediss+cluster://``) for a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
import re
import ssl
import sys
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Sequence
from importlib import resources
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import AuthenticationError, NoScriptError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config import RedisConfig
from ..errors import StoreError, StoreRefused
from .replies import ReplyKind, classify_reply

try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is optional (the 'all' extra)
    _hiredis_pack = None  # type: ignore[assignment]

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # pragma: no cover - redis-py requires async-timeout before 3.11.3
    from async_timeout import timeout as _timeout

__all__ = ["CACHE_SCRIPTS", "AsyncRedisStore", "RedisStore", "load_script"]

# The response cache's scripts (issue 11): registered always (no I/O), loaded by the
# server on their first use.
CACHE_SCRIPTS = ("cache_lookup", "cache_fetch", "cache_store", "cache_touch")

DEFAULT_URL = "redis://127.0.0.1:6379/0"

log = logging.getLogger("ai_saas_middleware")


@functools.cache
def load_script(name: str) -> str:
    """The source of ``store/lua/<name>.lua`` (read once, when a store first needs it).

    A line ``--#include <file>`` is replaced by that file of the same folder: scripts
    share Lua functions so (EVALSHA scripts cannot call each other).
    """
    folder = resources.files(__package__).joinpath("lua")
    lines = folder.joinpath(f"{name}.lua").read_text("utf-8").splitlines(keepends=True)
    return "".join(folder.joinpath(line.split()[1]).read_text("utf-8")
                   if line.startswith("--#include ") else line for line in lines)


def _retry_args(which: str, args: Sequence[Any]) -> Sequence[Any]:
    if which != "admit":
        return args
    if len(args) > 16:  # ARGV[17] is the retry flag; the cache's arguments follow it
        return [*args[:16], "retry", *args[17:]]
    return [*args, "retry"]


def _split_url(url: str) -> tuple[bool, str]:
    for scheme in ("redis+cluster://", "rediss+cluster://"):
        if url.startswith(scheme):
            return True, url.replace("+cluster", "", 1)
    return False, url


# The userinfo of a URL (what urlparse takes as such: up to the last '@' of the authority),
# and the query parameters that carry a secret or an identity.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
_SECRET_PARAMS = re.compile(r"([?&;](?:password|ssl_password|username)=)[^&;#]*",
                            re.IGNORECASE)


def _redact(url: str) -> str:
    """The URL without its credentials, for messages and logs: the userinfo
    (``user:pass@``, ``:pass@``) and ``password=`` / ``ssl_password=`` / ``username=``
    query parameters become ``***``."""
    return _SECRET_PARAMS.sub(r"\1***", _USERINFO.sub(r"\1***@", url))


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
        """The error for a failed call; marks the store down when it is an outage (a
        connection failure, a timeout, or a reply that means "not now")."""
        self.last_error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ResponseError) or isinstance(exc, AuthenticationError):
            kind = classify_reply(exc)
        else:
            kind = ReplyKind.OUTAGE
        if kind is ReplyKind.AUTH:
            # A misconfiguration, not bad luck: every call fails until someone fixes it.
            # Logged once per retry interval (a down store is not called meanwhile).
            log.error("Redis at %s refuses this client's credentials or ACL (%s); "
                      "treated as unavailable", self.url, self.last_error)
        if kind is ReplyKind.PERMANENT:
            return StoreError(f"Redis at {self.url}: {self.last_error}")
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError,
                            asyncio.TimeoutError, ResponseError)):
            self.down_until = time.monotonic() + self.retry_interval_s
        return StoreError(f"Redis at {self.url}: {self.last_error}")

    def refused(self, exc: ResponseError, what: str) -> StoreError:
        """The error for an error reply: :class:`StoreRefused` when retrying cannot help,
        else an outage (see :mod:`~ai_saas_middleware.store.replies`)."""
        if classify_reply(exc) is ReplyKind.PERMANENT:
            return StoreRefused(f"Redis refused {what}: {exc}")
        return self.failed(exc)

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


class _SyncLane:
    """Connections of a sync store that carry its scripts: the WSGI twin of :class:`_Lane`.

    Running a script through redis-py's ``Script`` and pooled client costs, per call, a
    pool checkout and release (a lock, and a poll of the socket for a server that hung
    up), retry and observability wrappers and a pure-Python packer: more than the round
    trip itself. Here a call takes an idle connection off a LIFO stack (a ``deque``:
    ``pop`` and ``append`` need no lock), sends one EVALSHA packed by hiredis, reads the
    reply and puts the connection back. A thread holds at most one, so there are never
    more connections than threads calling at once, and threads that come and go (a
    thread per request) reuse them.

    The connections are redis-py's own, made by the client's pool class with the pool's
    parameters: TCP, TLS (``rediss://``) or a unix socket, AUTH and SELECT from the URL,
    and the store's socket and connect timeouts, exactly as the pool would make them.

    A connection that fails in any way but an error reply (a timeout, a reset, a closed
    socket, an interrupt) is dropped, not put back: its state is unknown. One the server
    closed while it was idle (a restart, a failover, an idle timeout) fails on first use,
    where redis-py's pool would have polled it at checkout; :meth:`evalsha` then tries
    once more, at once, on a fresh connection, as :class:`AsyncRedisStore` does (a timeout
    is not retried: that would double the wait on a hung server). NOSCRIPT (a SCRIPT
    FLUSH, a restart) loads the script and runs it again, as redis-py's ``Script`` does.
    """

    def __init__(self, pool: redis.ConnectionPool):
        self._pool = pool
        self._idle: deque[Any] = deque()
        _sync_lanes.add(self)

    def _connect(self) -> Any:
        pool = self._pool
        conn = pool.connection_class(**pool.connection_kwargs)
        conn.connect()
        return conn

    def evalsha(self, script: Any, keys: Sequence[Any], args: Sequence[Any],
                which: str) -> Any:
        """EVALSHA ``script`` (a registered redis-py ``Script``); its reply, or the
        driver's exception (a ``ResponseError`` for an error reply)."""
        idle = self._idle
        try:
            conn = idle.pop()
        except IndexError:
            conn = None
        if conn is not None:
            try:
                return self._exchange(idle, conn, script, keys, args)
            except RedisConnectionError:
                # Safe to send again: settle.lua dedupes by request id, and admit.lua,
                # told it is a retry, does not count an attempt that did run twice.
                args = _retry_args(which, args)
        return self._exchange(idle, self._connect(), script, keys, args)

    def evalsha_many(self, calls: Sequence[tuple[Any, Sequence[Any], Sequence[Any]]]
                     ) -> list[Any]:
        """Several EVALSHAs written at once and their replies read in order: one network
        round trip. Each reply is the script's result or the ``ResponseError`` of its
        error reply (returned, not raised: the others are still read, so the connection
        stays in step). Any other failure drops the connection and raises."""
        idle = self._idle
        try:
            conn = idle.pop()
        except IndexError:
            conn = self._connect()
        try:
            conn.send_packed_command(tuple(
                _Lane.pack("EVALSHA", script.sha, len(keys), *keys, *args)
                for script, keys, args in calls), check_health=False)
            replies: list[Any] = []
            for _ in calls:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            conn.disconnect()
            raise
        idle.append(conn)
        return replies

    @staticmethod
    def _exchange(idle: deque[Any], conn: Any, script: Any, keys: Sequence[Any],
                  args: Sequence[Any]) -> Any:
        try:
            try:
                conn.send_packed_command((_Lane.pack("EVALSHA", script.sha, len(keys), *keys,
                                                     *args),), check_health=False)
                result = conn.read_response()
            except NoScriptError:
                conn.send_packed_command((_Lane.pack("SCRIPT", "LOAD", script.script),),
                                         check_health=False)
                sha = conn.read_response()
                script.sha = sha.decode() if isinstance(sha, bytes) else sha
                conn.send_packed_command((_Lane.pack("EVALSHA", script.sha, len(keys), *keys,
                                                     *args),), check_health=False)
                result = conn.read_response()
        except ResponseError:
            idle.append(conn)  # an error reply, read whole: the connection is in step
            raise
        except BaseException:
            conn.disconnect()
            raise
        idle.append(conn)
        return result

    def close(self) -> None:
        """Disconnect the idle connections; those in use are dropped when they return."""
        idle, self._idle = self._idle, deque()
        while idle:
            idle.pop().disconnect()

    def _forget(self) -> None:
        # In a forked child: the parent's connections are not ours to use (nor to shut
        # down; redis-py's disconnect() leaves a parent's socket alone).
        self._idle = deque()


_sync_lanes: weakref.WeakSet[_SyncLane] = weakref.WeakSet()


def _forget_connections_after_fork() -> None:
    for lane in list(_sync_lanes):
        lane._forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_connections_after_fork)


class RedisStore:
    """Synchronous store over redis-py.

    The scripts go down a :class:`_SyncLane` when hiredis is installed and the URL is not
    a cluster's; otherwise, and for plain commands, through the pooled client.

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
        self._admit = self.client.register_script(load_script("admit"))
        self._settle = self.client.register_script(load_script("settle"))
        self._usage = self.client.register_script(load_script("usage"))
        self._renew = self.client.register_script(load_script("renew"))
        self._release = self.client.register_script(load_script("release"))
        self._breaker = self.client.register_script(load_script("breaker"))
        for name in CACHE_SCRIPTS:
            setattr(self, "_" + name, self.client.register_script(load_script(name)))
        self._loaded = False
        # A cluster client routes each script to its slot's node; without hiredis the
        # pooled client does the work (slower, same behaviour).
        self._lane = (_SyncLane(self.client.connection_pool)
                      if not self.cluster and _hiredis_pack is not None else None)

    def _load_scripts(self) -> None:
        # Once per client, so that concurrent first requests do not all meet NOSCRIPT.
        # Script objects still reload on NOSCRIPT (a SCRIPT FLUSH, a failover).
        if not self.cluster:
            self.client.script_load(load_script("admit"))
            self.client.script_load(load_script("settle"))
        self._loaded = True

    def _run(self, which: str, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        self.health.check()
        try:
            if not self._loaded:
                self._load_scripts()
            lane = self._lane
            if lane is None:
                result = script(keys=keys, args=args)
            else:
                result = lane.evalsha(script, keys, args, which)
        except ResponseError as exc:
            raise self.health.refused(exc, "a script") from exc
        except (RedisError, OSError) as exc:
            raise self.health.failed(exc) from exc
        self.health.ok()
        return result

    def run_script(self, which: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run ``which``.lua (admit, settle, usage, renew, release, breaker); see its
        header."""
        return self._run(which, getattr(self, "_" + which), keys, args)

    def run_scripts(self, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]
                    ) -> list[Any]:
        """Run several scripts in one network round trip (pipelined), in order: each
        reply, or the :class:`StoreError` its call met (returned, not raised, so that one
        refused script does not hide the others' results). Without a lane (a cluster, no
        hiredis) they run one after another. A script the server does not know yet
        (NOSCRIPT) is run again alone, which loads it."""
        lane = self._lane
        if lane is None or not self._loaded:
            return [self._one_of(call) for call in calls]
        self.health.check()
        try:
            replies = lane.evalsha_many([(getattr(self, "_" + which), keys, args)
                                         for which, keys, args in calls])
        except (RedisError, OSError) as exc:
            raise self.health.failed(exc) from exc
        self.health.ok()
        out: list[Any] = []
        for call, reply in zip(calls, replies, strict=True):
            if isinstance(reply, NoScriptError):
                out.append(self._one_of(call))
            elif isinstance(reply, ResponseError):
                out.append(self.health.refused(reply, "a script"))
            else:
                out.append(reply)
        return out

    def _one_of(self, call: tuple[str, Sequence[str], Sequence[Any]]) -> Any:
        try:
            return self.run_script(*call)
        except StoreError as exc:
            return exc

    def call(self, *command: Any) -> Any:
        """Run one plain command (admin paths only, never the request path)."""
        self.health.check()
        try:
            result = self.client.execute_command(*command)
        except ResponseError as exc:
            raise self.health.refused(exc, str(command[0])) from exc
        except (RedisError, OSError) as exc:
            raise self.health.failed(exc) from exc
        self.health.ok()
        return result

    def out_of_step(self) -> None:
        """A reply was not the one its call expects: the lane's connections are dropped
        (their replies cannot be matched to calls any more) and made afresh."""
        if self._lane is not None:
            self._lane.close()

    def close(self) -> None:
        if self._lane is not None:
            self._lane.close()
        self.client.close()


class _LaneProtocol(asyncio.Protocol):
    """One connection of a :class:`_Lane`. Only the lane's current connection speaks
    for it: a connection it has dropped or replaced may still deliver bytes or its loss
    (asyncio reports them a loop tick or more later), which must not touch the calls or
    the reader of the connection after it."""

    def __init__(self, lane: _Lane):
        self.lane = lane
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.lane._transport is self.transport:
            self.lane._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lane._transport is self.transport:
            self.lane._on_lost(exc)


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
              "required": ssl.CERT_REQUIRED}


def _ssl_context(params: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context for a ``rediss://`` URL's parameters (``redis.connection.parse_url``),
    built exactly as redis-py's sync ``SSLConnection._wrap_socket_with_ssl`` builds it, so
    that both stores accept and refuse the same servers."""
    reqs: Any = params.get("ssl_cert_reqs", "required")
    if reqs is None:
        reqs = ssl.CERT_NONE
    elif isinstance(reqs, str):
        if reqs not in _CERT_REQS:
            raise RedisError(f"Invalid SSL Certificate Requirements Flag: {reqs}")
        reqs = _CERT_REQS[reqs]
    check_hostname = params.get("ssl_check_hostname", True) if reqs != ssl.CERT_NONE else False
    context = ssl.create_default_context()
    context.check_hostname = bool(check_hostname)
    context.verify_mode = reqs
    for flag in params.get("ssl_include_verify_flags") or ():
        context.verify_flags |= flag
    for flag in params.get("ssl_exclude_verify_flags") or ():
        context.verify_flags &= ~flag
    certfile: Any = params.get("ssl_certfile")
    keyfile = params.get("ssl_keyfile")
    if certfile or keyfile:
        context.load_cert_chain(certfile=certfile, keyfile=keyfile,
                                password=params.get("ssl_password"))
    cafile, capath, cadata = (params.get("ssl_ca_certs"), params.get("ssl_ca_path"),
                              params.get("ssl_ca_data"))
    if cafile is not None or capath is not None or cadata is not None:
        context.load_verify_locations(cafile=cafile, capath=capath, cadata=cadata)
    if params.get("ssl_min_version") is not None:
        context.minimum_version = params["ssl_min_version"]
    if params.get("ssl_ciphers"):
        context.set_ciphers(params["ssl_ciphers"])
    return context


def _reply_error(message: str) -> ResponseError:
    # hiredis builds error replies with this; NOSCRIPT gets redis-py's own class so the
    # store can reload the script exactly as redis-py's Script would.
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


class _Lane:
    """One connection per event loop that carries the hot-path scripts, pipelined.

    An asyncio Protocol, not a stream: a call packs its command (hiredis), writes it
    and waits on a future; replies are parsed as they arrive, as many as one read holds,
    and handed to the waiting futures in order. A call on an idle lane is written at
    once; calls made while others are in flight are gathered and written together at the
    end of the loop tick. Concurrent calls therefore share writes, reads and wake-ups,
    and a call costs no coroutine beyond its own await. One timer
    watches the oldest call in flight: past ``socket_timeout`` the connection is dropped
    and every call in flight fails (the connection's state is then unknown), so a hung
    Redis cannot hold a request longer than the timeout.

    A cancelled caller's reply is read and dropped, which keeps the order for the others.
    Connects (TCP, TLS or a unix socket) with the URL's AUTH and SELECT, lazily, once.
    """

    def __init__(self, url: str, cfg: RedisConfig):
        from redis.connection import parse_url

        self._params: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self._socket_timeout_s = cfg.socket_timeout_s
        self._connect_timeout_s = cfg.connect_timeout_s
        self._transport: asyncio.Transport | None = None
        self._reader: Any = None
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._connecting: asyncio.Future[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._outbox: list[bytes] = []  # commands of this loop tick, for one write

    @staticmethod
    def pack(*args: Any) -> bytes:
        """One command in RESP (hiredis's packer)."""
        return _hiredis_pack(args)  # type: ignore[no-any-return]

    def call(self, command: bytes) -> Awaitable[Any]:
        """Send one packed command; await its reply (a ResponseError is raised)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return self._connect_and_send(command)
        return self._send(transport, command)  # no coroutine in between on the hot path

    async def _connect_and_send(self, command: bytes) -> Any:
        await self._connect()
        transport = self._transport
        if transport is None or transport.is_closing():
            # Lost between its opening and this call's turn (a caller waiting on another's
            # connect resumes a loop tick or two after it): an outage like any lost
            # connection, which the store retries once on a fresh one.
            raise RedisConnectionError("connection to Redis lost before the command was sent")
        return await self._send(transport, command)

    def _send(self, transport: asyncio.Transport, command: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        pending = self._pending
        pending.append((future, loop.time() + self._socket_timeout_s))
        if self._watchdog is None:
            self._watchdog = loop.call_at(pending[0][1], self._check_overdue)
        if len(pending) == 1:  # an idle lane: write at once, the lowest latency
            transport.write(command)
        else:  # a busy lane: what this loop tick sends goes out in one write
            self._outbox.append(command)
            if len(self._outbox) == 1:
                loop.call_soon(self._flush)
        return future

    def call_many(self, commands: Sequence[bytes]) -> list[Awaitable[Any]]:
        """Send several packed commands in one write (on an idle lane; else with this loop
        tick's others); one awaitable reply each, in order."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return [self._connect_and_send(command) for command in commands]
        loop = asyncio.get_running_loop()
        pending = self._pending
        idle = not pending
        deadline = loop.time() + self._socket_timeout_s
        futures: list[Awaitable[Any]] = []
        for _command in commands:
            future = loop.create_future()
            pending.append((future, deadline))
            futures.append(future)
        if self._watchdog is None:
            self._watchdog = loop.call_at(pending[0][1], self._check_overdue)
        if idle:
            transport.write(b"".join(commands))
        else:
            first = not self._outbox
            self._outbox.extend(commands)
            if first:
                loop.call_soon(self._flush)
        return futures

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        transport = self._transport
        if transport is not None and outbox:  # (a dropped lane failed these calls)
            transport.write(b"".join(outbox))

    async def _connect(self) -> None:
        if self._connecting is not None:
            await asyncio.shield(self._connecting)
            return
        if self._transport is not None:  # closing: its calls in flight end with it, now
            self._drop(RedisConnectionError("connection to Redis lost: closed"))
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            await self._open(loop)
            self._connecting.set_result(None)
        except BaseException as exc:
            if self._transport is not None:  # opened, but its AUTH or SELECT did not answer
                self._drop(RedisConnectionError(f"cannot connect: {exc}"))
            # A refused AUTH (WRONGPASS, NOAUTH, NOPERM) stays an authentication error, as
            # redis-py's own connections raise it, so the store logs it as one.
            auth = isinstance(exc, ResponseError) and classify_reply(exc) is ReplyKind.AUTH
            kind = AuthenticationError if auth else RedisConnectionError
            self._connecting.set_exception(kind(f"cannot connect: {exc}"))
            self._connecting.exception()  # retrieved: waiters re-raise it, no warning
            raise kind(f"cannot connect to Redis: {exc}") from exc
        finally:
            self._connecting = None

    async def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        import hiredis

        params = self._params
        self._reader = hiredis.Reader(replyError=_reply_error)
        async with _timeout(self._connect_timeout_s):
            if params.get("path"):
                transport, _ = await loop.create_unix_connection(
                    lambda: _LaneProtocol(self), params["path"])
            else:
                ssl_context = None
                if params.get("connection_class") is redis.connection.SSLConnection:
                    ssl_context = _ssl_context(params)
                transport, _ = await loop.create_connection(
                    lambda: _LaneProtocol(self), params.get("host", "localhost"),
                    params.get("port", 6379), ssl=ssl_context)
            if transport.is_closing():  # the server closed it at once
                raise RedisConnectionError("the connection was closed as it opened")
            self._transport = transport
            handshake = []
            if params.get("password"):
                auth = ["AUTH", params["password"]]
                if params.get("username"):
                    auth.insert(1, params["username"])
                handshake.append(self._send(transport, self.pack(*auth)))
            if params.get("db"):
                handshake.append(self._send(transport,
                                            self.pack("SELECT", params["db"])))
            for reply in handshake:
                await reply

    def _on_data(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        while True:
            reply = reader.gets()
            if reply is False:
                return
            if not pending:  # a reply nobody asked for: the stream is out of step
                self._drop(RedisConnectionError("unexpected reply from Redis"))
                return
            future = pending.popleft()[0]
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _check_overdue(self) -> None:
        self._watchdog = None
        if not self._pending:
            return
        loop = asyncio.get_running_loop()
        deadline = self._pending[0][1]
        if loop.time() >= deadline:
            self._drop(RedisTimeoutError(f"no reply from Redis within "
                                         f"{self._socket_timeout_s:g}s"))
        else:
            self._watchdog = loop.call_at(deadline, self._check_overdue)

    def _drop(self, exc: Exception) -> None:
        """Fail every call in flight and close the connection (its state is unknown)."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()
        self._fail_pending(exc)

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending = self._pending, deque()
        self._outbox = []
        for future, _ in pending:
            if not future.done():
                future.set_exception(copy.copy(exc))
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _on_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail_pending(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    async def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self._fail_pending(RedisConnectionError("the store was closed"))


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
        self._renew: Any = None
        self._release: Any = None
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
        self._admit = client.register_script(load_script("admit"))
        self._settle = client.register_script(load_script("settle"))
        self._usage = client.register_script(load_script("usage"))
        self._renew = client.register_script(load_script("renew"))
        self._release = client.register_script(load_script("release"))
        for name in CACHE_SCRIPTS:
            setattr(self, "_" + name, client.register_script(load_script(name)))
        self._loading = None
        self._lane = None
        # A cluster client routes each script to its slot's node; without hiredis the
        # pooled client does the work (slower, same behaviour).
        if not self.cluster and _hiredis_pack is not None:
            self._lane = _Lane(self._plain, self.cfg)

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
            await client.script_load(load_script("admit"))
            await client.script_load(load_script("settle"))

    @property
    def client(self) -> Any:
        self._bind()
        return self._client

    async def run_script(self, which: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run ``which``.lua (admit, settle, usage, renew, release); see its header."""
        self.health.check()
        if self._loop is not asyncio.get_running_loop():
            self._bind()
        script = getattr(self, "_" + which)  # admit | settle | usage | renew | release | cache_*
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
            raise self.health.refused(exc, "a script") from exc
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise self.health.failed(exc) from exc
        self.health.ok()
        return result

    async def run_scripts(self, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]
                          ) -> list[Any]:
        """See :meth:`RedisStore.run_scripts`: on the lane, the calls are written before
        the first reply is read (one network round trip)."""
        if self._loop is not asyncio.get_running_loop():
            self._bind()
        lane = self._lane
        if lane is None or self._loading is None or not self._loading.done():
            return [await self._one_of(call) for call in calls]
        self.health.check()
        waits = lane.call_many([lane.pack("EVALSHA", getattr(self, "_" + which).sha, len(keys),
                                          *keys, *args) for which, keys, args in calls])
        replies = await asyncio.gather(*waits, return_exceptions=True)
        out: list[Any] = []
        for call, reply in zip(calls, replies, strict=True):
            if isinstance(reply, NoScriptError):
                out.append(await self._one_of(call))
            elif isinstance(reply, ResponseError):
                out.append(self.health.refused(reply, "a script"))
            elif isinstance(reply, (RedisError, OSError, asyncio.TimeoutError)):
                out.append(self.health.failed(reply))
            elif isinstance(reply, BaseException):
                raise reply
            else:
                out.append(reply)
        if not any(isinstance(r, StoreError) for r in out):
            self.health.ok()
        return out

    async def _one_of(self, call: tuple[str, Sequence[str], Sequence[Any]]) -> Any:
        try:
            return await self.run_script(*call)
        except StoreError as exc:
            return exc

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

    async def call(self, *command: Any) -> Any:
        self.health.check()
        try:
            result = await self.client.execute_command(*command)
        except ResponseError as exc:
            raise self.health.refused(exc, str(command[0])) from exc
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise self.health.failed(exc) from exc
        self.health.ok()
        return result

    def out_of_step(self) -> None:
        """See :meth:`RedisStore.out_of_step`: the lane's connection is dropped."""
        if self._lane is not None:
            self._lane._drop(RedisConnectionError("a reply out of step with its call"))

    async def close(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            if self._lane is not None:
                await self._lane.close()
            await self._client.aclose()
        self._client = self._loop = None
        self._lane = None
