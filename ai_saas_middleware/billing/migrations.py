"""The ledger's schema versions, applied in order by ``ai-saas billing migrate``.

Each step runs in its own transaction (:meth:`.Ledger.migrate`) and records its version
in ``ai_saas_schema``; two processes migrating at once take turns (PostgreSQL: an
advisory lock; SQLite: ``BEGIN IMMEDIATE``). A step is never edited once released: a
change is a new step.

Row-level security (PostgreSQL). Every tenant-scoped table gets ``FORCE ROW LEVEL
SECURITY`` (the owner is held to it too) and one policy: a row is visible and writable
only when ``ai_saas.tenant_id`` (set by :meth:`Ledger.tenant_scope`) names its tenant, or
when ``ai_saas.scope`` is ``all`` (set by :meth:`Ledger.writing`, the worker's and the
reports' transactions). A session that sets neither sees no row at all. Superusers and
``BYPASSRLS`` roles skip every policy, so the ledger's role must be neither
(``ai-saas billing migrate`` warns when it is).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection

from . import tables as t

__all__ = ["LATEST", "POLICY", "STEPS"]

POLICY = ("tenant_id = current_setting('ai_saas.tenant_id', true) "
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
                                 f"USING ({POLICY}) WITH CHECK ({POLICY})")


STEPS: tuple[Callable[[Connection, str], None], ...] = (_v1,)
LATEST = len(STEPS)
