"""The ledger's timestamps: ISO-8601 UTC with microseconds, as text (the same on SQLite
and PostgreSQL, and sortable as text)."""

from __future__ import annotations

from datetime import datetime, timezone

__all__ = ["now_iso"]


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
