"""Tasks that must finish even though whoever started them is gone (settlements, spool
replays): started on the running loop, held by a strong reference until done (the loop
keeps only weak ones), and awaited by :func:`wait_for_all` (tests, shutdown hooks)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

__all__ = ["start", "wait_for_all"]

_held: set[asyncio.Task[Any]] = set()


def start(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Run ``coro`` as a task of the running loop, held until it is done."""
    task = asyncio.get_running_loop().create_task(coro)
    _held.add(task)
    task.add_done_callback(_held.discard)
    return task


async def wait_for_all() -> None:
    """Wait until every held task of the running loop is done (callbacks scheduled
    before the call, which may start some, run first)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0)
    while True:
        pending = [task for task in list(_held) if task.get_loop() is loop]
        if not pending:
            return
        await asyncio.gather(*pending, return_exceptions=True)
