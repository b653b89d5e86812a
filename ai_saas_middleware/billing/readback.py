"""Usage events read back from the ledger in the stream's own form, for ``ai-saas usage``:
once the worker has moved events into the ledger and trimmed the streams, the usage of a
month is the ledger's rows plus the stream entries not in it yet."""

from __future__ import annotations

import os
from collections.abc import Iterator

from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from ..budgets import from_picodollars
from ..pricing import format_usd
from . import tables as t
from .ledger import Ledger

__all__ = ["ledger_events"]


def ledger_events(url: str, *, tenant_id: str | None = None, month: str | None = None
                  ) -> Iterator[dict[str, str]]:
    """The ledger's events as stream-event fields (nothing when there is no ledger yet)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not os.path.exists(parsed.database or ""):
        return
    ledger = Ledger(url)
    e = t.usage_events.c
    query = select(e.request_id, e.tenant_id, e.tier, e.model_id, e.prompt_tokens,
                   e.completion_tokens, e.usage_source, e.cost_p, e.status, e.ts)
    if tenant_id is not None:
        query = query.where(e.tenant_id == tenant_id)
    if month is not None:
        query = query.where(e.period == month)
    try:
        if not ledger.version():
            return
        with ledger.reading() as conn:
            for row in conn.execute(query):
                yield {"request_id": row.request_id, "tenant_id": row.tenant_id,
                       "tier": row.tier, "model_id": row.model_id,
                       "prompt_tokens": str(row.prompt_tokens),
                       "completion_tokens": str(row.completion_tokens),
                       "usage_source": row.usage_source,
                       "cost": format_usd(from_picodollars(row.cost_p)),
                       "status": str(row.status), "ts": row.ts}
    except SQLAlchemyError:
        return
    finally:
        ledger.close()
