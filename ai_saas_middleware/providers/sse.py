"""An incremental parser of server-sent events (no I/O): bytes in, events out.

The bytes come as the network delivers them, split anywhere (inside a line, inside a
UTF-8 character). :meth:`SSEParser.feed` keeps the unfinished tail and returns the
events completed by this piece: ``(event, data)`` with ``event`` the ``event:`` field
(``""`` when absent) and ``data`` its ``data:`` lines joined with newlines, as the
WHATWG rules say. Comments (``: ping``) and events without data are dropped.
"""

from __future__ import annotations

__all__ = ["SSEParser"]


class SSEParser:
    """Feed it chunks of an ``text/event-stream`` body; it returns completed events."""

    __slots__ = ("_buffer", "_data", "_event")

    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        """The events that ``chunk`` completes, in order."""
        buffer = self._buffer + chunk if self._buffer else chunk
        *lines, self._buffer = buffer.split(b"\n")
        events: list[tuple[str, str]] = []
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if line.endswith("\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append((self._event, "\n".join(self._data)))
                self._event, self._data = "", []
                continue
            name, colon, value = line.partition(":")
            if not colon:
                value = ""
            elif value.startswith(" "):
                value = value[1:]
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
        return events

    @property
    def pending(self) -> bool:
        """Whether part of an event is still unfinished (bytes or fields held)."""
        return bool(self._buffer.strip() or self._data)
