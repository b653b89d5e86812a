"""The ledger's schema versions, applied in order by ``ai-saas billing migrate``.

Each step runs in its own transaction and records its version in ``ai_saas_schema``;
two processes migrating at once take turns (PostgreSQL: an advisory lock; SQLite:
``BEGIN IMMEDIATE``). A step is never edited once released: a change is a new step.

Row-level security (PostgreSQL). Every tenant-scoped table gets ``FORCE ROW LEVEL
SECURITY`` (the owner is held to it too) and one policy: a row is visible and writable
only when ``ai_saas.tenant_id`` (set by :meth:`Ledger.tenant_scope`) names its tenant, or
when ``ai_saas.scope`` is ``all`` (set by :meth:`Ledger.writing`, the worker's and the
reports' transactions). A session that sets neither sees no row at all. Superusers and
``BYPASSRLS`` roles skip every policy, so the ledger's role must be neither
(``ai-saas billing migrate`` warns when it is).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import Connection, func, select, text

from . import tables as t

if TYPE_CHECKING:
    from .ledger import Ledger

__all__ = ["LATEST", "STEPS", "migrate"]

log = logging.getLogger("ai_saas_middleware.billing")

_POLICY = ("tenant_id = current_setting('ai_saas.tenant_id', true) "
           "OR current_setting('ai_saas.scope', true) = 'all'")


def _v1(conn: Connection, dialect: str) -> None:
    """The first schema: events, daily aggregates, pricing versions, flags, Stripe
    deliveries, rejected entries, the billing log; RLS on PostgreSQL."""
    t.metadata.create_all(conn, checkfirst=True)
    if dialect == "postgresql":
        for table in t.TENANT_TABLES:
            conn.exec_driver_sql(f"ALTER TABLE {table.name} ENABLE ROW LEVEL SECURITY")
            conn.exec_driver_sql(f"ALTER TABLE {table.name} FORCE ROW LEVEL SECURITY")
            conn.exec_driver_sql(f"DROP POLICY IF EXISTS tenant_isolation ON {table.name}")
            conn.exec_driver_sql(f"CREATE POLICY tenant_isolation ON {table.name} "
                                 f"USING ({_POLICY}) WITH CHECK ({_POLICY})")


STEPS: tuple[Callable[[Connection, str], None], ...] = (_v1,)
LATEST = len(STEPS)


def migrate(ledger: Ledger) -> tuple[int, int]:
    """Apply every step the ledger lacks; (version before, version after)."""
    from .ledger import now_iso

    before = ledger.version()
    current = before
    for number, step in enumerate(STEPS, start=1):
        if number <= current:
            continue
        with ledger.writing() as conn:
            if ledger.dialect == "postgresql":
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(727274101)")
            if conn.dialect.has_table(conn, t.schema_version.name):
                done = int(conn.execute(select(func.max(t.schema_version.c.version)))
                           .scalar() or 0)
                if done >= number:  # another process applied it meanwhile
                    current = done
                    continue
            step(conn, ledger.dialect)
            conn.execute(t.schema_version.insert(), {"version": number,
                                                     "applied_at": now_iso()})
            ledger.log_action(conn, "migrate", f"schema version {number}: "
                              f"{(step.__doc__ or '').split(chr(10))[0]}")
            current = number
    if ledger.dialect == "postgresql":
        with ledger.engine.connect() as conn:
            bypass = conn.execute(text("SELECT rolsuper OR rolbypassrls FROM pg_roles "
                                       "WHERE rolname = current_user")).scalar()
        if bypass:
            log.warning("billing: the ledger's role %s is a superuser or has BYPASSRLS: "
                        "PostgreSQL applies no row-level security to it", "(current_user)")
    return before, current
