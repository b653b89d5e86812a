"""What a forked child must not inherit as it is.

A pre-forking server (gunicorn, uWSGI) may build the gateway in its master and fork its
workers from it. A child inherits its parent's objects but none of its threads, and the
parent's sockets, claims and queued samples are the parent's: each object that holds such
things registers here, and its ``_after_fork()`` runs in every forked child (one
``os.register_at_fork`` for them all).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

__all__ = ["reset_in_children"]

_objects: weakref.WeakSet[Any] = weakref.WeakSet()


def reset_in_children(obj: Any) -> None:
    """Run ``obj._after_fork()`` in every process forked from this one from now on (for
    as long as ``obj`` lives)."""
    _objects.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_objects):
        obj._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
