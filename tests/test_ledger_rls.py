"""Row-level security of the ledger on PostgreSQL: a read made on a tenant's behalf
(Ledger.tenant_scope) cannot see or change another tenant's rows, whatever the query
says; a session that names no scope sees nothing. As a role without BYPASSRLS, the owner
of the tables (FORCE ROW LEVEL SECURITY holds it to the policy too)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError
from test_margin_rules import event

from ai_saas_middleware.billing import tables as t
from ai_saas_middleware.billing.ledger import Ledger
from ai_saas_middleware.billing.rates import Pricing
from ai_saas_middleware.config import BillingConfig


@pytest.fixture
def ledger(postgres: Any) -> Iterator[Ledger]:
    name, url = postgres.database()
    ledger = Ledger(url)
    ledger.migrate()
    pricing = Pricing(BillingConfig())
    ledger.register(pricing)
    ledger.record([event(i, tenant, "free", "0.001") for tenant in ("acme", "globex")
                   for i in range(3)], pricing)
    yield ledger
    ledger.close()
    postgres.drop(name)


TABLES = [t.usage_events, t.usage_daily]


def test_a_tenant_scoped_query_sees_only_that_tenants_rows_whatever_it_asks(
        ledger: Ledger) -> None:
    with ledger.tenant_scope("acme") as conn:
        for table in TABLES:
            tenants = set(conn.execute(select(table.c.tenant_id)).scalars())
            assert tenants == {"acme"}, table.name
        # A faulty query that names the other tenant, or none: nothing of globex's.
        assert conn.execute(select(func.count()).select_from(t.usage_events)
                            .where(t.usage_events.c.tenant_id == "globex")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM usage_events")).scalar() == 3
        # Nor can it change another tenant's rows...
        changed = conn.execute(update(t.usage_events)
                               .where(t.usage_events.c.tenant_id == "globex")
                               .values(revenue_p=0))
        assert changed.rowcount == 0
    # ...or write a row in another tenant's name.
    with pytest.raises(DBAPIError, match="row-level security"):
        with ledger.tenant_scope("acme") as conn:
            conn.execute(text("UPDATE usage_events SET tenant_id = 'globex'"))
    # The other tenant's own scope sees its rows, and only those.
    with ledger.tenant_scope("globex") as conn:
        assert set(conn.execute(select(t.usage_events.c.tenant_id)).scalars()) == {"globex"}


def test_a_session_that_names_no_scope_sees_nothing(ledger: Ledger) -> None:
    with ledger.engine.connect() as conn:
        for table in TABLES:
            assert conn.execute(select(func.count()).select_from(table)).scalar() == 0
    with ledger.reading() as conn:  # the service scope: billing's own transactions
        assert conn.execute(select(func.count()).select_from(t.usage_events)).scalar() == 6


def test_the_ledger_role_is_held_to_the_policy(ledger: Ledger) -> None:
    with ledger.engine.connect() as conn:
        role = conn.execute(text("SELECT rolsuper, rolbypassrls FROM pg_roles "
                                 "WHERE rolname = current_user")).one()
        forced = conn.execute(text("SELECT relname FROM pg_class WHERE relforcerowsecurity "
                                   "AND relrowsecurity ORDER BY relname")).scalars().all()
    assert tuple(role) == (False, False)
    assert set(forced) == {table.name for table in t.TENANT_TABLES}
