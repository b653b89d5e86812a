"""What keeps serving and billing honest while Redis is unreachable.

- :class:`Spool`: settlement script calls that could not run are appended to a local
  append-only file (one JSON line each, fsynced) and replayed, in order, once Redis
  answers again. settle.lua ignores a request id it has already settled, so a replay
  of an event whose first attempt did reach Redis (a timeout after the write) counts
  once. Files of a process that died are replayed by the next one that finds them.

Where: ``redis.spoolDir``, else :meth:`Spool.default_dir` (``$XDG_STATE_HOME/ai-saas/
spool-<prefix>``, else ``~/.local/state/ai-saas/spool-<prefix>``, else a private
``<tmp>/ai-saas-<uid>/spool-<prefix>``). The directory is created ``0700``; one that is a
symlink, belongs to another user or can be written by group or others is refused at
start-up (a :class:`~ai_saas_middleware.errors.ConfigError` naming ``redis.spoolDir``),
and a replay is skipped (logged at ERROR) if it became so later: whoever can write the
spool can write usage events and move quota counters.

A replay runs only well-formed settlements of this deployment: kind ``settle``, every
key one of the named tenant's keys in this deployment's :class:`KeySchema` (prefix and
shards), numeric arguments numeric, event fields from :data:`EVENT_FIELDS`. Anything
else, and any call Redis refuses for good (a
:class:`~ai_saas_middleware.errors.StoreRefused`), is *set aside* in ``rejected.jsonl``
with its error and an ERROR log line naming the request id; ``ai-saas spool status``
shows what is set aside and ``ai-saas spool replay --rejected`` retries it. An outage
(a plain :class:`~ai_saas_middleware.errors.StoreError`) stops a replay and keeps the
rest, in order, for the next one.

Timeline of a replay racing an append (why the inode check in ``append``)::

    writer: open(path)            replayer: lock(path); rename(path -> .replaying)
    writer: lock(fd) ... waits    replayer: unlock; read .replaying; settle each; unlink
    writer: lock granted; fd is the renamed inode -> reopen path, write there instead
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, ConfigProblem, StoreError, StoreRefused
from .store.keys import KeySchema, is_valid_tenant_id

__all__ = ["EVENT_FIELDS", "Spool", "SpoolStatus", "SpoolUnsafe", "event_of"]

log = logging.getLogger("ai_saas_middleware")

SpoolEntry = tuple[str, list[str], list[Any]]  # ("settle", KEYS, ARGV), as spooled

#: The fields of a usage event (settle.lua's ARGV after its numeric arguments).
EVENT_FIELDS = frozenset({
    "request_id", "tenant_id", "tier", "model_id", "provider", "prompt_tokens",
    "completion_tokens", "usage_source", "cost", "latency_ms", "status", "cache",
    "fallback_from", "outcome_value", "ts", "endpoint", "client_disconnected",
    "price_version", "truncated",
})
_INTEGER_FIELDS = ("prompt_tokens", "completion_tokens", "latency_ms", "status",
                   "price_version")
_INTEGER = re.compile(r"-?[0-9]{1,19}")
_COST = re.compile(r"[0-9]{1,20}(\.[0-9]{1,30})?")
_RESERVATION = re.compile(  # after '<request id> ': tokens, month[, picodollars, day]
    r"[0-9]{1,19} [0-9]{4}-(0[1-9]|1[0-2])( [0-9]{1,19} [0-9]{4}-(0[1-9]|1[0-2])-[0-3][0-9])?")
REJECTED = "rejected.jsonl"



def _names_request(arg: str, request_id: str) -> bool:
    """``arg`` is the request id, or its reservation member (``store.keys.reservation_member``:
    a spool written before reservations were one member holds the bare id)."""
    if arg == request_id:
        return True
    return (arg.startswith(request_id + " ")
            and _RESERVATION.fullmatch(arg, len(request_id) + 1) is not None)

class SpoolUnsafe(StoreError):
    """The spool directory is not private to this user (a symlink, another owner, or
    writable by group or others): its entries cannot be trusted."""


def _unsafe_reason(path: Path) -> str | None:
    """Why ``path`` cannot be trusted as a spool directory, or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "it does not exist"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid != os.getuid():
        return f"it belongs to uid {st.st_uid}, not this process's uid {os.getuid()}"
    if st.st_mode & 0o022:
        return f"group or others can write it (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _append_lines(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` under an exclusive lock, fsynced; if the file was
    renamed away meanwhile (claimed by a replayer), write to the new one instead."""
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.write(fd, data)
                os.fsync(fd)
                return
        finally:
            os.close(fd)  # closing releases the lock


def event_of(args: list[Any]) -> dict[str, str] | None:
    """The usage event of a settle call's ARGV (the field/value pairs that begin at
    ``request_id``), or None when the ARGV has no such tail."""
    try:
        start = args.index("request_id")
    except ValueError:
        return None
    tail = args[start:]
    if len(tail) % 2:
        return None
    return dict(zip(tail[0::2], tail[1::2], strict=True))


def _tenant_of(entry: Any) -> str:
    try:
        event = event_of(list(entry[2]))
    except (TypeError, IndexError, KeyError, AttributeError):
        event = None
    return str((event or {}).get("tenant_id", "?"))


def _request_of(entry: Any) -> str:
    try:
        event = event_of(list(entry[2]))
    except (TypeError, IndexError, KeyError, AttributeError):
        event = None
    return str((event or {}).get("request_id", "?"))


@dataclass
class SpoolStatus:
    """What a spool directory holds (``ai-saas spool status``).

    ``pending``/``claims``: file name -> number of entries, for spool files waiting for a
    replay and for files a replayer has claimed (``*.replaying``; one older than a minute
    belongs to a replayer that died and is taken over by the next replay). ``set_aside``:
    (request id, tenant id, error) of each entry in ``rejected.jsonl``. ``per_tenant``:
    tenant id -> (pending entries, set-aside entries).
    """

    directory: Path
    pending: dict[str, int] = field(default_factory=dict)
    claims: dict[str, int] = field(default_factory=dict)
    set_aside: list[tuple[str, str, str]] = field(default_factory=list)
    per_tenant: dict[str, tuple[int, int]] = field(default_factory=dict)


class Spool:
    """An append-only, fsynced file of script calls waiting for Redis.

    Args:
        directory: the spool directory (created ``0700`` if missing).
        keys: this deployment's key schema; a replay runs only entries whose keys it
            builds (None: the keys are not checked, for tools that only read).

    Raises:
        ConfigError: the directory cannot be created, or is not private to this user.
    """

    def __init__(self, directory: str | os.PathLike[str], keys: KeySchema | None = None):
        self.dir = Path(directory)
        self.keys = keys
        self.path = self.dir / f"spool-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        self._lock = threading.Lock()
        self._replay_lock = threading.Lock()  # one sync replay at a time; others wait
        self._areplay: asyncio.Future[None] | None = None  # the asyncio replay running
        self._alock: asyncio.Lock | None = None
        self._open_dir()
        self.pending = self._has_files()

    @staticmethod
    def default_dir(key_prefix: str) -> Path:
        """Where a deployment's spool lives when ``redis.spoolDir`` is not set: a private
        per-user state directory, never a shared predictable path.

        ``$XDG_STATE_HOME/ai-saas/spool-<prefix>``, else ``~/.local/state/ai-saas/
        spool-<prefix>``; without a usable home directory, ``<tmp>/ai-saas-<uid>/
        spool-<prefix>`` (refused at start-up if another user made that first).
        """
        name = f"spool-{key_prefix}"
        state = os.environ.get("XDG_STATE_HOME")
        if state and os.path.isabs(state):
            return Path(state) / "ai-saas" / name
        home = os.path.expanduser("~")
        if home != "~" and os.path.isdir(home) and os.access(home, os.W_OK):
            return Path(home) / ".local" / "state" / "ai-saas" / name
        return Path(tempfile.gettempdir()) / f"ai-saas-{os.getuid()}" / name

    def _open_dir(self) -> None:
        """Create the directory (0700) and refuse it unless it is private to this user."""
        try:
            self.dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.dir.mkdir(exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError([ConfigProblem(
                "redis.spoolDir", "a directory this process can create",
                f"{self.dir}: {exc.strerror or exc}")]) from None
        reason = _unsafe_reason(self.dir)
        if reason is not None:
            raise ConfigError([ConfigProblem(
                "redis.spoolDir", "a directory of this user that no other user can write "
                                  "(a spool's entries are replayed as usage events)",
                f"{self.dir}: {reason}")])

    def _has_files(self) -> bool:
        try:
            return any(self.dir.glob("spool-*.jsonl")) or any(self.dir.glob("*.replaying"))
        except OSError:
            return False

    def append(self, call: tuple[str, list[str], list[Any]]) -> None:
        """Append one call; durable when this returns."""
        line = (json.dumps([call[0], call[1], [str(a) for a in call[2]]]) + "\n").encode()
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            _append_lines(self.path, line)
            self.pending = True

    # ---------------------------------------------------------------- validation

    def malformed(self, entry: Any) -> str | None:
        """Why ``entry`` is not a settlement this deployment would have spooled, or None.

        Checked: the shape ``["settle", [keys...], [args...]]``; the event's fields are
        from :data:`EVENT_FIELDS`, with a valid ``tenant_id``, a ``request_id`` and
        integer token counts, latency and status, and a decimal cost; the arguments
        before the event are integers, or the request's own reservation member (its id,
        or ``'<request id> <tokens> <YYYY-MM>'``); every key is one of that tenant's keys in this
        deployment's schema (its ``<prefix>:{s<shard>}:t:<tenant>:...`` keys or its
        shard's stream), so an entry can never touch another tenant's counter.
        """
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            return "not a [kind, keys, args] triple"
        kind, keys, args = entry
        if kind != "settle":
            return f"kind {str(kind)[:20]!r} is not 'settle'"
        if not (isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys)):
            return "keys are not a list of strings"
        if not isinstance(args, list):
            return "arguments are not a list"
        # Spooled arguments are strings; integers are accepted as the same text.
        args = [str(a) if isinstance(a, int) and not isinstance(a, bool) else a for a in args]
        if not all(isinstance(a, str) for a in args):
            return "arguments are not strings or integers"
        event = event_of(args)
        if event is None:
            return "no usage event in the arguments"
        head = args[:args.index("request_id")]
        request_id = event["request_id"]
        if not head or not all(_INTEGER.fullmatch(a) or _names_request(a, request_id)
                               for a in head):
            return ("the script's leading arguments are not integers (or the request's "
                    "reservation)")
        unknown = set(event) - EVENT_FIELDS
        if unknown or len(event) * 2 != len(args) - len(head):
            return "the event has unknown or repeated fields"
        tenant_id = event.get("tenant_id", "")
        if not is_valid_tenant_id(tenant_id):
            return "the event names no valid tenant"
        if not request_id:
            return "the event has no request id"
        for name in _INTEGER_FIELDS:
            if name in event and not _INTEGER.fullmatch(event[name]):
                return f"the event's {name} is not an integer"
        if "cost" in event and not _COST.fullmatch(event["cost"]):
            return "the event's cost is not a decimal amount"
        if self.keys is not None:
            own = self.keys.tenant(tenant_id)
            if not all(k == own.stream or k.startswith(own.base + ":") for k in keys):
                return (f"a key is not one of tenant {tenant_id}'s keys in this deployment "
                        f"(prefix {self.keys.prefix!r}, {self.keys.shards} shards)")
        return None

    # ---------------------------------------------------------------- replay

    def _safe_to_replay(self) -> bool:
        reason = _unsafe_reason(self.dir)
        if reason is None:
            return True
        if reason == "it does not exist":
            return False  # nothing to replay
        log.error("not replaying the spool in %s: %s (its entries cannot be trusted)",
                  self.dir, reason)
        return False

    def _claim(self) -> list[Path]:
        """Rename every spool file this process can lock to ``*.replaying``; oldest first."""
        claimed: list[Path] = []
        try:
            files = sorted(self.dir.glob("spool-*.jsonl"), key=lambda p: p.stat().st_mtime)
        except OSError:
            return claimed
        uid = os.getuid()
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:  # gone, or a symlink
                continue
            try:
                if os.fstat(fd).st_uid != uid:
                    log.error("not replaying spool file %s: it belongs to another user", path)
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                target = path.with_suffix(f".{secrets.token_hex(3)}.replaying")
                try:
                    os.rename(path, target)
                except FileNotFoundError:
                    continue
                claimed.append(target)
            finally:
                os.close(fd)
        # A replayer that died left its claims: taken over after a minute. (A file may go
        # between the listing and its stat: another replayer put it back or finished.)
        for path in self.dir.glob("*.replaying"):
            try:
                stale = time.time() - path.stat().st_mtime > 60
            except OSError:
                continue
            if stale and path not in claimed:
                claimed.append(path)
        return claimed

    @staticmethod
    def entries(path: Path) -> list[Any]:
        """The JSON records of one spool file, in order, read only: ``[]`` when the file
        is gone; a torn line (a write cut short by a crash) is skipped and logged."""
        entries: list[Any] = []
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:
            return entries
        for raw in text.splitlines():
            try:
                entries.append(json.loads(raw))
            except ValueError:
                log.error("skipping a torn line in spool file %s", path)
        return entries

    def _keep(self, path: Path, entries: list[Any], done: int, order: int = 0) -> None:
        rest = entries[done:]
        if not rest:
            path.unlink(missing_ok=True)
            return
        # Put what is left back where the next replay finds it, in order.
        back = path.with_name(f"spool-{os.getpid()}-{secrets.token_hex(4)}.jsonl")
        if done == 0:
            # Nothing of it was sent (the usual case: Redis failed on the first entry): the
            # file itself goes back, atomically, so no moment shows its entries twice.
            os.rename(path, back)
        else:
            back.write_text("".join(json.dumps(list(e)) + "\n" for e in rest), "utf-8")
            path.unlink(missing_ok=True)
        os.utime(back, (order, order))  # oldest first next time, in their order

    def _give_back(self, path: Path, entries: list[Any], done: int,
                   untouched: list[Path]) -> None:
        """A replay that stops half way puts back the rest of the file in hand and every
        file it claimed but did not reach, in the order they had, for the next replay."""
        self._keep(path, entries, done, 0)
        for order, other in enumerate(untouched, start=1):
            self._keep(other, self.entries(other), 0, order)

    def set_aside(self, entry: Any, error: BaseException | str) -> None:
        """Put an entry that can never succeed in ``rejected.jsonl``, loudly (an ERROR
        line naming its request id; never a key or the event's content).

        It would block every replay behind it; ``ai-saas spool replay --rejected``
        retries it once the cause is fixed.
        """
        request_id = _request_of(entry)
        message = str(error)
        try:  # a reply may name a key (WRONGTYPE <key> ...): keys stay out of log lines
            for i, key in enumerate(entry[1]):
                message = message.replace(str(key), f"KEYS[{i + 1}]")
        except (TypeError, IndexError, KeyError):
            pass
        log.error("usage event %s set aside in %s (it will not be replayed until "
                  "'ai-saas spool replay --rejected'): %s", request_id,
                  self.dir / REJECTED, message)
        record = {"call": list(entry) if isinstance(entry, (list, tuple)) else entry,
                  "request_id": request_id, "tenant_id": _tenant_of(entry),
                  "error": str(error),
                  "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            _append_lines(self.dir / REJECTED, (json.dumps(record) + "\n").encode())

    def _replay_steps(self) -> Generator[SpoolEntry, StoreError | None, None]:
        """Replay as steps: yields each spooled call, is sent the error it met (or None)."""
        if not self._safe_to_replay():
            return
        claimed = self._claim()
        for n, path in enumerate(claimed):
            entries = self.entries(path)
            done = 0
            for entry in entries:
                reason = self.malformed(entry)
                if reason is not None:
                    self.set_aside(entry, f"malformed spool entry, not sent: {reason}")
                    done += 1
                    continue
                try:
                    error = yield (entry[0], entry[1], entry[2])
                except GeneratorExit:
                    # The replayer was interrupted (a cancelled task) with this entry in
                    # flight: it and the rest go back for the next replay, not left claimed
                    # for a minute. Its script may have run: settle.lua dedupes the retry.
                    self._give_back(path, entries, done, claimed[n + 1:])
                    raise
                if isinstance(error, StoreRefused):
                    self.set_aside(entry, error)
                elif error is not None:  # Redis is gone again: keep the rest, in order
                    self._give_back(path, entries, done, claimed[n + 1:])
                    return
                done += 1
            self._keep(path, entries, done)
        self.pending = self._has_files()

    def replay(self, run: Callable[[SpoolEntry], Any]) -> None:
        """Replay every claimable spooled call with ``run``, oldest first.

        A replay already running in another thread is waited for, not skipped: what was
        spooled meanwhile is then replayed too, before the caller's own event, so no
        event waits for a later settlement (and the stream stays in order).
        """
        with self._replay_lock:
            if self.pending:
                _drive(self._replay_steps(), run)

    async def areplay(self, run: Callable[[SpoolEntry], Awaitable[Any]]) -> None:
        """Asyncio twin of :meth:`replay` (a replay running on this loop is waited for)."""
        loop = asyncio.get_running_loop()
        while self._areplay is not None and self._areplay.get_loop() is loop:
            await asyncio.shield(self._areplay)
        if not self.pending:
            return
        # One replayer per process: a sync one (another loop's thread, the lease keeper's
        # round) is not waited for here, which would block the loop; what this caller
        # spools meanwhile is replayed by that one's next round or the next settlement.
        if not self._replay_lock.acquire(blocking=False):
            return
        running = self._areplay = loop.create_future()
        steps = self._replay_steps()
        try:
            entry = next(steps)
            while True:
                try:
                    await run(entry)
                    error = None
                except StoreError as exc:
                    error = exc
                entry = steps.send(error)
        except StopIteration:
            pass
        finally:
            steps.close()  # interrupted half way: the claimed file is put back
            self._replay_lock.release()
            if self._areplay is running:
                self._areplay = None
            running.set_result(None)

    # ---------------------------------------------------------------- set aside

    def retry_set_aside(self, run: Callable[[SpoolEntry], Any]) -> tuple[int, int]:
        """Run each set-aside entry again (``ai-saas spool replay --rejected``).

        Those that succeed leave ``rejected.jsonl``; those refused again (or malformed)
        stay with their new error; an outage stops the retry and keeps the rest.

        Returns:
            (entries written now, entries still set aside).
        """
        if not self._safe_to_replay():
            raise SpoolUnsafe(f"the spool directory {self.dir} is not private to this user")
        claimed = self._claim_rejected()
        records: list[Any] = []
        for path in claimed:
            records += self.entries(path)
        written, keep = 0, []
        for i, record in enumerate(records):
            entry = record.get("call") if isinstance(record, dict) else None
            reason = self.malformed(entry)
            if reason is not None:
                keep.append(record)
                continue
            try:
                run((entry[0], entry[1], entry[2]))  # type: ignore[index]
                written += 1
            except StoreRefused as exc:
                keep.append({**record, "error": str(exc)})
            except StoreError:
                keep += records[i:]  # Redis is unavailable: keep the rest, as they were
                break
        if keep:
            with self._lock:
                _append_lines(self.dir / REJECTED,
                              "".join(json.dumps(r) + "\n" for r in keep).encode())
        for path in claimed:
            path.unlink(missing_ok=True)
        return written, len(keep)

    def _claim_rejected(self) -> list[Path]:
        """``rejected.jsonl`` renamed for a retry (appenders then start a new one), and
        the files of a retry that died half way."""
        claimed = [p for p in self.dir.glob("rejected-*.retrying")
                   if time.time() - p.stat().st_mtime > 60]
        path = self.dir / REJECTED
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return claimed
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            target = self.dir / f"rejected-{os.getpid()}-{secrets.token_hex(3)}.retrying"
            os.rename(path, target)
            claimed.append(target)
        finally:
            os.close(fd)
        return claimed

    # ---------------------------------------------------------------- status

    def status(self) -> SpoolStatus:
        """What the directory holds now (read only: nothing is claimed or changed)."""
        result = SpoolStatus(self.dir)
        pending: Counter[str] = Counter()
        aside: Counter[str] = Counter()

        def count(paths: Iterable[Path], into: dict[str, int]) -> None:
            for path in sorted(paths):
                entries = self.entries(path)
                into[path.name] = len(entries)
                pending.update(_tenant_of(e) for e in entries)

        count(self.dir.glob("spool-*.jsonl"), result.pending)
        count(self.dir.glob("*.replaying"), result.claims)
        for path in [self.dir / REJECTED, *sorted(self.dir.glob("rejected-*.retrying"))]:
            for record in self.entries(path):
                if not isinstance(record, dict):
                    continue
                tenant = str(record.get("tenant_id") or _tenant_of(record.get("call")))
                result.set_aside.append((str(record.get("request_id", "?")), tenant,
                                         str(record.get("error", ""))))
                aside[tenant] += 1
        result.per_tenant = {t: (pending[t], aside[t]) for t in sorted({*pending, *aside})}
        return result


def _drive(steps: Generator[SpoolEntry, StoreError | None, None],
           run: Callable[[SpoolEntry], Any]) -> None:
    try:
        entry = next(steps)
        while True:
            try:
                run(entry)
                error = None
            except StoreError as exc:
                error = exc
            entry = steps.send(error)
    except StopIteration:
        pass
    finally:
        steps.close()
