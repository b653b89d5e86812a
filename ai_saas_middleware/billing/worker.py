"""The billing worker: usage events from the Redis streams into the ledger, exactly once.

One consumer group, :data:`GROUP`, over every shard stream. A worker:

1. reads a batch with ``XREADGROUP`` (its own pending entries first, after a start or a
   failure: what it read but could not commit is read again), and sends the read of the
   next batch at once (Redis prepares it meanwhile);
2. parses and prices it and commits it to the ledger in **one transaction**, which
   inserts each ``request_id`` once, forever (:meth:`Ledger.prepare` in this thread,
   :meth:`Prepared.commit` in the committer thread while this one goes on to the next
   batch: see :meth:`Worker.step`);
3. acknowledges the entries (``XACK``) **only after** the commit. A crash before the
   ``XACK`` leaves them pending; they are read again (by this worker when it restarts
   under the same name, else taken by another with ``XCLAIM`` once the consumer holding
   them has itself been idle for ``billing.worker.claimIdle``: a worker that still reads
   is never robbed of its batch), and the ledger's key makes a second insert a no-op;
4. every ``trimInterval``: claims entries idle too long, trims each stream below what
   *every* consumer group has acknowledged (``XTRIM MINID``: never an entry some group
   has not acknowledged), forgets consumers gone for an hour with nothing pending, logs
   progress and lag. Stripe delivery (:mod:`.stripe_sync`) runs in a thread of its own
   during :meth:`Worker.run`, so an unwell Stripe never holds up the streams.

``stop()`` (SIGTERM, SIGINT in ``ai-saas worker``) lets the batch in hand finish, then
the worker returns; its longest wait is one ``XREADGROUP`` block (1 s by default).
Several workers may run at once, on one ledger (SQLite included).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from redis.exceptions import RedisError, ResponseError
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from ..config import Config, load_config
from ..errors import AISaaSError
from ..store.keys import KeySchema
from ..store.redis import RedisStore
from ..tabulate import table
from .events import Event, Rejected, parse_entry
from .ledger import Ledger, Prepared, Recorded
from .rates import Pricing

__all__ = ["GROUP", "ShardStatus", "Worker", "cmd_worker", "status"]

log = logging.getLogger("ai_saas_middleware.billing")

GROUP = "ai-saas-billing"
# Shutdown stays "within seconds" (DESIGN.md): the Stripe thread's round is waited for
# this long, the final round is given this long.
_DELIVERY_JOIN_S = 5.0
_FINAL_DELIVERY_S = 5.0
_FORGET_CONSUMER_MS = 3_600_000  # a consumer idle this long with nothing pending is removed
_PROGRESS_S = 10.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _next_id(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _older(a: str, b: str) -> bool:
    am, _, asq = a.partition("-")
    bm, _, bsq = b.partition("-")
    return (int(am), int(asq or 0)) < (int(bm), int(bsq or 0))


@dataclass
class Progress:
    """What a worker has done since it started."""

    read: int = 0
    inserted: int = 0
    duplicates: int = 0
    rejected: int = 0
    claimed: int = 0
    trimmed: int = 0
    failures: int = 0
    started: float = field(default_factory=time.monotonic)


class Worker:
    """One billing worker (a consumer of :data:`GROUP`).

    Args:
        config: the configuration (a :class:`Config`, a path or a mapping).
        ledger_url: overrides ``billing.database``.
        name: the consumer name (default ``<host>-<pid>-<random>``). A worker restarted
            under its old name reads its own pending entries first.
        redis_url: overrides ``redis.url``.
        own_process: the worker is the process's only work (``ai-saas worker``): then
            :meth:`run` and :meth:`drain` keep Python's cyclic garbage collector from
            running within a batch and collect between them instead, every
            ``trimInterval``. A batch makes hundreds of thousands of short-lived lists,
            which set the collector off again and again over what is still alive:
            measured, that was 40% of the worker's CPU time. (Not for a worker inside
            an app's process: the switch is the whole process's.)
    """

    def __init__(self, config: Config | Any, *, ledger_url: str | None = None,
                 name: str | None = None, redis_url: str | None = None,
                 own_process: bool = False):
        self.config = load_config(config)
        self.own_process = own_process
        self._gc_held = False
        billing = self.config.billing
        self.settings = billing.worker
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{random.randrange(16**4):04x}"
        self.keys = KeySchema(self.config.redis.key_prefix, self.config.redis.shards)
        self.streams = self.keys.streams()
        # Reads block: the socket waits longer than the block, unlike the hot path's store.
        cfg = replace(self.config.redis, socket_timeout_s=self.settings.block_ms / 1000 + 10,
                      connect_timeout_s=max(self.config.redis.connect_timeout_s, 2.0))
        self.store = RedisStore(cfg, redis_url or self.config.redis.url
                                or os.environ.get("REDIS_URL"))
        self.redis = self.store.client
        # Replies as Redis sends them (flat lists of bytes): redis-py's own turn every
        # entry into a dict first, which costs more than the rest of the parse.
        for command in ("XREADGROUP", "XCLAIM", "XINFO GROUPS", "XINFO CONSUMERS",
                        "XINFO STREAM", "XPENDING"):
            self.redis.set_response_callback(command, lambda reply, **_: reply)
        self.ledger = Ledger(ledger_url or billing.database)
        self.ledger.migrate()
        self.pricing = Pricing(billing)
        self.ledger.register(self.pricing)
        self.progress = Progress()
        self._stopping = threading.Event()
        self._committer = ThreadPoolExecutor(max_workers=1,
                                             thread_name_prefix="ai-saas-billing-commit")
        self._inflight: Future[None] | None = None
        # A connection with the next batch's XREADGROUP sent and its reply not yet read:
        # Redis prepares that reply (its own CPU) while this process parses and records
        # the batch in hand, instead of this process waiting for it.
        self._ahead: Any = None
        self._recover = True  # read this consumer's own pending entries first
        self._groups_made = False
        self._groups_seen = False  # made (or found) once: a group made after is one lost
        self._last_upkeep = 0.0
        self._last_progress = time.monotonic()
        self.deliverer = self._deliverer()

    # -- life

    def stop(self) -> None:
        """Finish the batch in hand, then return from :meth:`run` (signal-safe)."""
        self._stopping.set()
        if self.deliverer is not None:  # a Stripe round in progress ends soon
            self.deliverer.halt()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def close(self) -> None:
        self._settle_quietly()
        self._drop_ahead()
        self._committer.shutdown(wait=True)
        self.store.close()
        self.ledger.close()

    def _settle_quietly(self) -> None:
        """Wait for the batch in flight; a failure only logged (its entries stay pending,
        read again at the next start or taken over by another worker)."""
        try:
            self.settle()
        except (RedisError, OSError, AISaaSError, SQLAlchemyError) as exc:
            log.warning("billing worker %s: the last batch was not committed (%s); it is "
                        "read again", self.name, str(exc).splitlines()[0][:300] if str(exc)
                        else type(exc).__name__)

    @contextmanager
    def _collect_between_batches(self) -> Iterator[None]:
        """With ``own_process``: the cyclic collector off for the duration (:meth:`upkeep`
        collects every ``trimInterval``) and what is alive at the start frozen out of
        its collections, both undone after."""
        if not self.own_process or not gc.isenabled():
            yield
            return
        gc.disable()
        # What is alive now (modules, the engines, the config: 75,000 objects) is the
        # process's for good: frozen, each collection in upkeep() skips it (a full
        # collection over it was 74 ms) and traverses only what the batches left.
        gc.freeze()
        self._gc_held = True
        try:
            yield
        finally:
            self._gc_held = False
            gc.unfreeze()
            gc.enable()

    def run(self) -> None:
        """Work until :meth:`stop`. Redis or the ledger being down is waited out (with
        backoff), never fatal."""
        with self._collect_between_batches():
            self._run()

    def _run(self) -> None:
        log.info("billing worker %s: started on %d streams, ledger %s", self.name,
                 len(self.streams), self.ledger.url)
        delivery = None
        if self.deliverer is not None:
            delivery = threading.Thread(target=self._deliver, daemon=True,
                                        name="ai-saas-billing-stripe")
            delivery.start()
        delay = 0.0
        while not self.stopping:
            if delay:
                self._stopping.wait(delay)
            try:
                handled = self.step(self.settings.block_ms)
                self.upkeep(deliver=False)
                delay = 0.0
                if not handled and self.store.cluster:  # a cluster's reads do not block
                    self._stopping.wait(self.settings.block_ms / 1000)
            except (RedisError, OSError, AISaaSError, SQLAlchemyError) as exc:
                delay = min(max(delay * 2, 0.25), 5.0)
                self._failed(exc, delay)
        log.info("billing worker %s: stopping: the batch in hand is finished first", self.name)
        self._finish_ahead()
        self._settle_quietly()
        if delivery is not None:
            # A halted round ends after its current request to Stripe or the ledger.
            delivery.join(timeout=_DELIVERY_JOIN_S)
        if delivery is not None and delivery.is_alive():
            # Stopping anyway is what a crash would do, and safe: delivery state is in the
            # ledger, and what was sent unrecorded is sent again, under the same identifier.
            log.warning("billing worker %s: a Stripe round is still waiting on Stripe or the "
                        "ledger; the worker stops without it (what it did not record is "
                        "sent again at the next start)", self.name)
        else:
            self._final_delivery()
        self._log_progress(final=True)

    def _deliver(self) -> None:
        """Stripe delivery while :meth:`run` runs, in a thread of its own: a round that
        waits on an unwell Stripe never holds up the streams."""
        while not self._stopping.wait(0.25):
            try:
                self.deliverer.tick()
            except Exception as exc:  # any: delivery resumes at the next tick
                log.error("billing worker %s: a Stripe delivery round failed (%s); it is "
                          "tried again", self.name, type(exc).__name__)

    def drain(self, timeout_s: float = 60.0) -> int:
        """Work until the streams hold nothing new and nothing pending for :data:`GROUP`
        (entries pending on another consumer are claimed once idle for ``claimIdle``);
        returns the events inserted meanwhile. Raises ``TimeoutError`` past ``timeout_s``."""
        with self._collect_between_batches():
            return self._drain(timeout_s)

    def _drain(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        before = self.progress.inserted
        delay = 0.0
        while not self.stopping:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the streams were not drained within {timeout_s}s")
            if delay:
                time.sleep(delay)
            try:
                handled = self.step(100)
                self.upkeep(force=handled == 0)
                delay = 0.0
                if handled == 0 and self._outstanding() == 0:
                    break
            except (RedisError, OSError, AISaaSError, SQLAlchemyError) as exc:
                delay = min(max(delay * 2, 0.1), 2.0)
                self._failed(exc, delay)
        self._finish_ahead()
        self._settle_quietly()
        self._final_delivery()
        return self.progress.inserted - before

    def _failed(self, exc: BaseException, delay: float) -> None:
        # Nothing in flight when the pending entries are read again (it would be read
        # twice: harmless, the ledger's key sees to it, but wasted).
        self._settle_quietly()
        # A batch read ahead is pending on this consumer: the recovery read takes it again.
        self._drop_ahead()
        self.progress.failures += 1
        self._recover = True  # what was read and not committed is read again
        if isinstance(exc, RedisError):
            # Redis may have come back without its data (no persistence, a failover to an
            # empty replica) or a stream may have been deleted: the group is gone with
            # it, and settle.lua's XADD makes the stream again without one (NOGROUP at
            # every read). Made again before the next read (it exists: BUSYGROUP).
            self._groups_made = False
        what = "the ledger" if isinstance(exc, SQLAlchemyError) else "Redis"
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0][:300] \
            if isinstance(exc, DBAPIError) else str(exc).splitlines()[0][:300] if str(exc) \
            else type(exc).__name__
        log.warning("billing worker %s: %s failed (%s); retrying in %.2fs, nothing "
                    "acknowledged", self.name, what, detail, delay)

    # -- one batch

    def _ensure_groups(self) -> None:
        if self._groups_made:
            return
        made = []
        for stream in self.streams:
            try:
                self.redis.execute_command("XGROUP", "CREATE", stream, GROUP, "0", "MKSTREAM")
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            else:
                made.append(stream)
        if made and self._groups_seen:
            log.error("billing worker %s: the consumer group of %d stream(s) was gone (Redis "
                      "restarted without its data, or the streams were deleted), e.g. %s: "
                      "made again from each stream's start; what they held before is not "
                      "in them any more (`ai-saas billing audit` shows what is missing)",
                      self.name, len(made), made[0])
        self._groups_made = self._groups_seen = True

    def _read(self, block_ms: int) -> list[tuple[str, str, Any]]:
        """(stream, entry id, fields) of the next batch: the one read ahead if any, else
        this consumer's own pending entries while recovering, else new ones."""
        if self._ahead is not None:
            conn, self._ahead = self._ahead, None
            try:
                reply = conn.read_response()
            except BaseException:
                conn.disconnect()
                raise
            finally:
                self.redis.connection_pool.release(conn)
            return [entry for batch in self._entries(reply) for entry in batch]
        out: list[tuple[str, str, Any]] = []
        if self._recover:
            for reply in self._xreadgroup(self.streams, "0", None):
                out += reply
            if out:
                return out
            self._recover = False
        for reply in self._xreadgroup(self.streams, ">", block_ms or None):
            out += reply
        return out

    def _read_args(self, streams: list[str], start: str, block: int | None) -> list[Any]:
        args: list[Any] = ["XREADGROUP", "GROUP", GROUP, self.name, "COUNT",
                           self.settings.batch_size]
        if block is not None and not self.store.cluster:
            args += ["BLOCK", block]
        return [*args, "STREAMS", *streams, *([start] * len(streams))]

    def _read_ahead(self) -> None:
        """Send the next batch's read now (new entries, no block) and take its reply at
        the next :meth:`_read`. Not on a cluster (one read per node), not while
        recovering (the pending entries come first), not when stopping."""
        if self.store.cluster or self._recover or self.stopping or self._ahead is not None:
            return
        pool = self.redis.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_command(*self._read_args(self.streams, ">", None))
        except BaseException:
            conn.disconnect()
            pool.release(conn)
            raise
        self._ahead = conn

    def _drop_ahead(self) -> None:
        """Forget a read sent ahead (its connection closed with the reply unread): its
        entries are pending on this consumer, read again by the recovery read at the next
        start or failure, or taken by another worker once idle for ``claimIdle``."""
        conn, self._ahead = self._ahead, None
        if conn is not None:
            conn.disconnect()
            self.redis.connection_pool.release(conn)

    def _finish_ahead(self) -> None:
        """On the way out: the batch read ahead is in hand, so it is recorded too (a
        failure only logged: its entries stay pending, as any batch not committed)."""
        if self._ahead is None:
            return
        try:
            batch = self._read(0)
            if batch:
                self.settle()
                self._commit(batch)
        except (RedisError, OSError, AISaaSError, SQLAlchemyError) as exc:
            self._drop_ahead()
            log.warning("billing worker %s: the batch read last was not committed (%s); "
                        "it is read again", self.name, str(exc).splitlines()[0][:300]
                        if str(exc) else type(exc).__name__)

    def _xreadgroup(self, streams: list[str], start: str, block: int | None
                    ) -> Iterable[list[tuple[str, str, Any]]]:
        # A cluster keeps each shard's stream on its own slot: one read per stream there
        # (without blocking: a block on each would add up), one read for all elsewhere.
        groups = [[s] for s in streams] if self.store.cluster else [streams]
        for group in groups:
            yield from self._entries(self.redis.execute_command(
                *self._read_args(group, start, block)))

    def _entries(self, reply: Any) -> Iterator[list[tuple[str, str, Any]]]:
        """Each stream's (stream, entry id, fields) of an ``XREADGROUP`` reply."""
        for stream, entries in _stream_replies(reply):
            # A pending entry deleted meanwhile comes back with no fields: nothing to
            # record, but acknowledged, or it would stay pending forever.
            batch = [(stream, _text(eid), fields) for eid, fields in entries if fields]
            if len(batch) < len(entries):  # the rare case: a second pass, for those
                gone = [_text(eid) for eid, fields in entries if not fields]
                self.redis.execute_command("XACK", stream, GROUP, *gone)
            yield batch

    def step(self, block_ms: int = 0) -> int:
        """Read a batch, send the read of the next (Redis prepares it meanwhile), parse
        and price it and do this process's share of its insert (:meth:`Ledger.prepare`),
        then hand it to the committer thread, which finishes and commits it and only then
        acknowledges it, while this thread reads and prepares the next. The entries read;
        a failure of the batch before is raised here (none of it was acknowledged).

        The split is by whose CPU does the work: what runs in this process (parsing,
        SQLite's inserts, the ``COPY`` of PostgreSQL's rows) runs here, in turn: done in
        two threads it only time-slices one core (a GIL hand-off at every row, caches
        thrashed: measured, 20-30% more CPU per event). The committer thread waits: on
        SQLite's ``fsync``, on PostgreSQL's server inserting and aggregating the rows."""
        self._ensure_groups()
        # With a batch in flight, never block: its acknowledgement would wait on the read.
        batch = self._read(0 if self._inflight is not None else block_ms)
        if not batch:
            self.settle()
            return 0
        self._read_ahead()
        events, rejected = self._parse(batch)
        # SQLite has one writer: the batch before commits first. So does PostgreSQL's when
        # a margin rule switches pricing (this batch is priced after its flags are in).
        if self.ledger.dialect == "sqlite" or self.pricing.switched:
            self.settle()
        prepared = self.ledger.prepare(events, self.pricing, rejected)
        try:
            self.settle()
        except BaseException:  # the batch before failed: this one is read again too
            prepared.rollback()
            raise
        self._inflight = self._committer.submit(self._finish, batch, prepared)
        return len(batch)

    def settle(self) -> None:
        """Wait for the batch in flight: committed and acknowledged, or its error raised."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.result()

    def _commit(self, batch: list[tuple[str, str, Any]]) -> None:
        """Parse, commit and acknowledge ``batch`` in this thread."""
        self._record(batch, *self._parse(batch))

    def _parse(self, batch: list[tuple[str, str, Any]]
               ) -> tuple[list[Event], list[tuple[str, str, str]]]:
        events: list[Event] = []
        rejected: list[tuple[str, str, str]] = []
        for stream, entry_id, fields in batch:
            where = f"{stream} {entry_id}"
            try:
                events.append(parse_entry(where, fields))
            except Rejected as exc:
                rejected.append((where, str(exc), _raw(fields)))
                log.error("billing worker %s: stream entry %s is not a usage event (%s); "
                          "kept in rejected_events", self.name, where, exc)
        return events, rejected

    def _record(self, batch: list[tuple[str, str, Any]], events: list[Event],
                rejected: list[tuple[str, str, str]]) -> None:
        done = self.ledger.record(events, self.pricing, rejected)  # raises: nothing acked
        self._ack(batch)
        self._count(batch, done)

    def _finish(self, batch: list[tuple[str, str, Any]], prepared: Prepared) -> None:
        done = prepared.commit()  # raises: nothing acked
        self._ack(batch)
        self._count(batch, done)

    def _count(self, batch: list[tuple[str, str, Any]], done: Recorded) -> None:
        p = self.progress
        p.read += len(batch)
        p.inserted += done.inserted
        p.duplicates += done.duplicates
        p.rejected += done.rejected

    def _ack(self, batch: list[tuple[str, str, Any]]) -> None:
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id, _ in batch:
            by_stream.setdefault(stream, []).append(entry_id)
        if self.store.cluster:
            for stream, ids in by_stream.items():
                self.redis.execute_command("XACK", stream, GROUP, *ids)
            return
        pipe = self.redis.pipeline(transaction=False)
        for stream, ids in by_stream.items():
            pipe.execute_command("XACK", stream, GROUP, *ids)
        pipe.execute()

    # -- upkeep

    def upkeep(self, force: bool = False, deliver: bool = True) -> None:
        """Claim, trim, forget, log: every ``trimInterval`` (or now); with ``deliver``,
        a Stripe round when its interval has passed (:meth:`run` has a thread for it)."""
        now = time.monotonic()
        if deliver and self.deliverer is not None:
            self.deliverer.tick()
        if now - self._last_progress >= _PROGRESS_S:
            self._log_progress()
        if not force and now - self._last_upkeep < self.settings.trim_interval_s:
            return
        self._last_upkeep = now
        if self._gc_held:
            gc.collect()
        self._claim()
        self._trim()

    def _each(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies of ``commands``, in one round trip (a pipeline; on a cluster, one
        command at a time): upkeep asks the same of every stream, and 16 streams' round
        trips one by one were a tenth of a 100,000-event drain's wall time."""
        if self.store.cluster:
            return [self.redis.execute_command(*command) for command in commands]
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute())

    def _claim(self) -> None:
        """Take over what a gone consumer of the group left pending, and commit it: the
        entries of every *other* consumer that has itself been idle (no read, no claim)
        for ``claimIdle`` -- a worker killed, or stuck, before acknowledging them.

        A consumer that still reads is not robbed, however long its batch takes (a slow
        commit, a large batch on a busy machine), and this consumer never claims its own
        entries: they are in its hands, or read again by its recovery read when it starts
        under its name. (Claiming by entry idle time alone, ``XAUTOCLAIM``, took a live
        worker's batch in flight and recorded it twice, the second time as duplicates, and
        under load two workers took each other's batches in turn.)"""
        self._ensure_groups()  # (upkeep may come first: XINFO needs the streams)
        idle_ms = int(self.settings.claim_idle_s * 1000)
        count = self.settings.batch_size
        infos = self._each([("XINFO", "CONSUMERS", stream, GROUP) for stream in self.streams])
        asks = []
        for stream, consumers in zip(self.streams, infos, strict=True):
            for consumer in consumers or ():
                info = _pairs(consumer)
                name = _text(info[b"name"])
                if (name != self.name and int(info[b"pending"]) > 0
                        and int(info[b"idle"]) >= idle_ms):
                    asks.append((stream, name))
        while asks and not self.stopping:
            pending = self._each([("XPENDING", stream, GROUP, "IDLE", idle_ms, "-", "+",
                                   count, consumer) for stream, consumer in asks])
            takes = [(stream, consumer, [entry[0] for entry in entries])
                     for (stream, consumer), entries in zip(asks, pending, strict=True)
                     if entries]
            claimed = self._each([("XCLAIM", stream, GROUP, self.name, idle_ms, *ids)
                                  for stream, _, ids in takes]) if takes else []
            for (stream, _, _ids), reply in zip(takes, claimed, strict=True):
                if self.stopping:  # what is claimed and not committed: read at our restart
                    return
                # (An entry trimmed from the stream meanwhile is not in the reply, or is a
                # nil or has no fields before Redis 7; XCLAIM drops it from the pending list.)
                entries = [(stream, _text(item[0]), item[1]) for item in reply
                           if item and item[1]]
                if entries:
                    self.progress.claimed += len(entries)
                    log.info("billing worker %s: took over %d entries of %s from a consumer "
                             "idle over %.0fs", self.name, len(entries), stream,
                             self.settings.claim_idle_s)
                    self.settle()  # the batch in flight may hold the ledger's write lock
                    self._commit(entries)
            # A consumer that had a full page may have more.
            asks = [(stream, consumer) for stream, consumer, ids in takes if len(ids) >= count]

    def _trim(self) -> None:
        """Trim each stream below what every group of it has acknowledged; forget this
        group's consumers long gone."""
        infos = self._each([("XINFO", "GROUPS", stream) for stream in self.streams])
        groups = {stream: [_pairs(g) for g in info]
                  for stream, info in zip(self.streams, infos, strict=True) if info}
        asks: list[tuple[Any, ...]] = []
        for stream, those in groups.items():
            for group in those:
                name = _text(group[b"name"])
                if int(group[b"pending"]) > 0:
                    asks.append(("XPENDING", stream, name))
                if name == GROUP:
                    asks.append(("XINFO", "CONSUMERS", stream, GROUP))
        answers = iter(self._each(asks)) if asks else iter(())
        trims: list[tuple[Any, ...]] = []
        for stream, those in groups.items():
            floor: str | None = None
            for group in those:
                name = _text(group[b"name"])
                oldest = next(answers)[1] if int(group[b"pending"]) > 0 else None
                if oldest is not None:
                    keep = _text(oldest)  # the oldest entry a consumer holds
                else:
                    # Nothing pending, or no longer by the XPENDING (the committer thread,
                    # or another worker, acknowledged the last of it meanwhile: its
                    # summary is then [0, nil, nil, nil]): all up to the last delivered
                    # entry of the snapshot is acknowledged.
                    keep = _next_id(_text(group[b"last-delivered-id"]))
                if floor is None or _older(keep, floor):
                    floor = keep
                if name == GROUP:
                    self._forget_consumers(stream, next(answers))
            if floor is not None and floor != "0-1":
                trims.append(("XTRIM", stream, "MINID", "~", floor))
        if trims:
            self.progress.trimmed += sum(int(n) for n in self._each(trims))

    def _forget_consumers(self, stream: str, consumers: list[Any]) -> None:
        for consumer in consumers:
            info = _pairs(consumer)
            name = _text(info[b"name"])
            if (name != self.name and int(info[b"pending"]) == 0
                    and int(info[b"idle"]) > _FORGET_CONSUMER_MS):
                self.redis.execute_command("XGROUP", "DELCONSUMER", stream, GROUP, name)

    def _outstanding(self) -> int:
        """Entries of :data:`GROUP` not yet acknowledged, over every stream (lag +
        pending)."""
        total = 0
        infos = self._each([("XINFO", "GROUPS", stream) for stream in self.streams])
        for stream, groups in zip(self.streams, infos, strict=True):
            for group in groups:
                info = _pairs(group)
                if _text(info[b"name"]) == GROUP:
                    lag = info.get(b"lag")
                    total += int(info[b"pending"])
                    if lag is None:  # Redis < 7, or a lag Redis cannot tell
                        last = self.redis.execute_command("XINFO", "STREAM", stream)
                        lag = 0 if _text(_pairs(last)[b"last-generated-id"]) == \
                            _text(info[b"last-delivered-id"]) else 1
                    total += int(lag)
        return total

    def _log_progress(self, final: bool = False) -> None:
        now = time.monotonic()
        p = self.progress
        elapsed = max(now - p.started, 1e-9)
        try:
            lag = self._outstanding()
        except (RedisError, OSError, AISaaSError):
            lag = -1
        self._last_progress = now
        log.info("billing worker %s: %s%d events read, %d inserted, %d duplicates, %d "
                 "rejected, %d taken over, %d trimmed, %.0f/s; %s outstanding",
                 self.name, "stopped: " if final else "", p.read, p.inserted, p.duplicates,
                 p.rejected, p.claimed, p.trimmed, p.read / elapsed,
                 "?" if lag < 0 else lag)

    # -- Stripe

    def _deliverer(self) -> Any:
        if self.config.billing.stripe is None:
            return None
        from .stripe_sync import Deliverer, customers_of

        return Deliverer(self.config, self.ledger, customers_of(self.config, self.store))

    def _final_delivery(self) -> None:
        """The last Stripe round. Stopping (a signal, :meth:`stop`): 5 s in all, so that
        shutdown stays within seconds. A drain that ended by itself (``--once``): a whole
        round, every delivery gathered and sent, only its retries of an unwell Stripe
        bounded (as a tick's), so that a cron run leaves nothing behind for a healthy
        Stripe however long the round takes."""
        if self.deliverer is None:
            return
        from .stripe_sync import TICK_BUDGET_S

        try:
            if self.stopping:
                self.deliverer.flush(budget_s=_FINAL_DELIVERY_S, final=True)
            else:
                self.deliverer.flush(budget_s=TICK_BUDGET_S)
        except Exception as exc:
            log.warning("billing worker %s: the last Stripe delivery failed (%s); it is "
                        "sent at the next start", self.name, exc)


def _stream_replies(reply: Any) -> list[tuple[str, list[Any]]]:
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3
        return [(_text(k), v[0] if v and isinstance(v[0], list) and len(v) == 1
                 and isinstance(v[0][0], list) else v) for k, v in reply.items()]
    return [(_text(stream), entries) for stream, entries in reply]


def _pairs(value: Any) -> dict[bytes, Any]:
    if isinstance(value, dict):
        return {(k if isinstance(k, bytes) else str(k).encode()): v for k, v in value.items()}
    return {(k if isinstance(k, bytes) else str(k).encode()): v
            for k, v in zip(value[::2], value[1::2], strict=True)}


def _raw(fields: Any) -> str:
    items = fields.items() if isinstance(fields, dict) else zip(fields[::2], fields[1::2],
                                                                 strict=False)
    return json.dumps({(k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)):
                       (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
                       for k, v in items})[:100_000]


# --------------------------------------------------------------------------- status


@dataclass(frozen=True, slots=True)
class ShardStatus:
    stream: str
    length: int
    pending: int
    lag: int | None
    last_event_ms: int | None  # the newest entry's time
    consumers: tuple[tuple[str, int, int], ...]  # (name, pending, idle ms)


def status(config: Config, redis_url: str | None = None) -> list[ShardStatus]:
    """Each shard stream's state for :data:`GROUP` (``ai-saas worker --status``)."""
    keys = KeySchema(config.redis.key_prefix, config.redis.shards)
    store = RedisStore(config.redis, redis_url or config.redis.url
                       or os.environ.get("REDIS_URL"))
    out = []
    try:
        for stream in keys.streams():
            length = int(store.call("XLEN", stream))
            pending, lag = 0, None
            consumers: tuple[tuple[str, int, int], ...] = ()
            last_ms = None
            if length or store.call("EXISTS", stream):
                info = _pairs(store.call("XINFO", "STREAM", stream))
                last = _text(info[b"last-generated-id"])
                last_ms = int(last.split("-")[0]) or None
                for group in store.call("XINFO", "GROUPS", stream):
                    g = _pairs(group)
                    if _text(g[b"name"]) == GROUP:
                        pending = int(g[b"pending"])
                        lag = int(g[b"lag"]) if g.get(b"lag") is not None else None
                        consumers = tuple(
                            (_text(c[b"name"]), int(c[b"pending"]), int(c[b"idle"]))
                            for c in map(_pairs, store.call("XINFO", "CONSUMERS", stream,
                                                            GROUP)))
                if lag is None and not consumers and pending == 0:
                    lag = length  # no worker has read this stream yet
            out.append(ShardStatus(stream, length, pending, lag, last_ms, consumers))
    finally:
        store.close()
    return out


def _format_status(rows: list[ShardStatus]) -> str:
    def when(ms: int | None) -> str:
        if ms is None:
            return "-"
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))

    lines = [("stream", "entries", "pending", "lag", "last event", "consumers")]
    for r in rows:
        lines.append((r.stream, str(r.length), str(r.pending),
                      "?" if r.lag is None else str(r.lag), when(r.last_event_ms),
                      ", ".join(f"{n} ({p} pending, idle {i // 1000}s)"
                                for n, p, i in r.consumers) or "-"))
    return table(lines)


def cmd_worker(args: Any) -> int:
    """``ai-saas worker``: run until SIGTERM/SIGINT (or ``--once``), or ``--status``."""
    config = load_config(args.config)
    if args.status:
        rows = status(config, args.redis_url)
        if args.format == "json":
            print(json.dumps([{"stream": r.stream, "entries": r.length, "pending": r.pending,
                               "lag": r.lag, "last_event_ms": r.last_event_ms,
                               "consumers": [{"name": n, "pending": p, "idle_ms": i}
                                             for n, p, i in r.consumers]} for r in rows],
                             indent=2))
        else:
            print(_format_status(rows))
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    worker = Worker(config, ledger_url=args.database, name=args.name,
                    redis_url=args.redis_url, own_process=True)
    previous = {sig: signal.signal(sig, lambda *_: worker.stop())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if args.once:
            worker.drain(timeout_s=float("inf"))
        else:
            worker.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        worker.close()
    return 0
