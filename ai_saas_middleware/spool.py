"""What keeps serving and billing honest while Redis is unreachable.

- :class:`Spool`: settlement script calls that could not run are appended to a local
  append-only file (one JSON line each, fsynced) and replayed, in order, once Redis
  answers again. settle.lua ignores a request id it has already settled, so a replay
  of an event whose first attempt did reach Redis (a timeout after the write) counts
  once. Files of a process that died are replayed by the next one that finds them.

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
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path
from typing import Any

from .errors import StoreError, StoreRefused

__all__ = ["Spool"]

log = logging.getLogger("ai_saas_middleware")


class Spool:
    """An append-only, fsynced file of script calls waiting for Redis."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.dir = Path(directory)
        self.path = self.dir / f"spool-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        self._lock = threading.Lock()
        self._replaying = False
        self._alock: asyncio.Lock | None = None
        self.pending = self._has_files()

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
            while True:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    try:
                        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                    except FileNotFoundError:
                        same = False
                    if same:
                        os.write(fd, line)
                        os.fsync(fd)
                        break
                finally:
                    os.close(fd)  # closing releases the lock
            self.pending = True

    def _claim(self) -> list[Path]:
        """Rename every spool file this process can lock to ``*.replaying``; oldest first."""
        claimed: list[Path] = []
        try:
            files = sorted(self.dir.glob("spool-*.jsonl"), key=lambda p: p.stat().st_mtime)
        except OSError:
            return claimed
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
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
        claimed += [p for p in self.dir.glob("*.replaying") if p not in claimed
                    and time.time() - p.stat().st_mtime > 60]  # a replayer that died
        return claimed

    @staticmethod
    def _entries(path: Path) -> list[tuple[str, list[str], list[Any]]]:
        entries = []
        for raw in path.read_text("utf-8").splitlines():
            try:
                kind, keys, args = json.loads(raw)
            except ValueError:
                log.error("skipping a torn line in spool file %s", path)
                continue
            entries.append((kind, keys, args))
        return entries

    def _keep(self, path: Path, entries: list[Any], done: int) -> None:
        rest = entries[done:]
        if not rest:
            path.unlink(missing_ok=True)
            return
        # Put what is left back where the next replay finds it, in order.
        back = path.with_name(f"spool-{os.getpid()}-{secrets.token_hex(4)}.jsonl")
        back.write_text("".join(json.dumps(list(e)) + "\n" for e in rest), "utf-8")
        os.utime(back, (0, 0))  # oldest first next time
        path.unlink(missing_ok=True)

    def _reject(self, entry: tuple[str, list[str], list[Any]], exc: StoreRefused) -> None:
        """Set aside an entry Redis refuses (it would block every replay behind it)."""
        log.error("spooled usage call refused by Redis, set aside in %s: %s",
                  self.dir / "rejected.jsonl", exc)
        with open(self.dir / "rejected.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"call": list(entry), "error": str(exc)}) + "\n")

    def _replay_steps(self) -> Generator[tuple[str, list[str], list[Any]],
                                         StoreError | None, None]:
        """Replay as steps: yields each spooled call, is sent the error it met (or None)."""
        for path in self._claim():
            entries = self._entries(path)
            done = 0
            for entry in entries:
                error = yield entry
                if isinstance(error, StoreRefused):
                    self._reject(entry, error)
                elif error is not None:  # Redis is gone again: keep the rest, in order
                    self._keep(path, entries, done)
                    return
                done += 1
            self._keep(path, entries, done)
        self.pending = self._has_files()

    def replay(self, run: Callable[[tuple[str, list[str], list[Any]]], Any]) -> None:
        """Replay every claimable spooled call with ``run``, oldest first."""
        with self._lock:
            if self._replaying:
                return
            self._replaying = True
        steps = self._replay_steps()
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
            self._replaying = False

    async def areplay(self, run: Callable[[tuple[str, list[str], list[Any]]],
                                          Awaitable[Any]]) -> None:
        """Asyncio twin of :meth:`replay`."""
        if self._replaying:
            return
        self._replaying = True
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
            self._replaying = False
