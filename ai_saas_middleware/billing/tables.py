"""The ledger's tables (SQLAlchemy Core), the same on SQLite and PostgreSQL.

Money is stored as whole picodollars (10^-12 USD) in 64-bit integers, never as a float
or a database NUMERIC that SQLite would keep as one: a column named ``*_p`` holds
picodollars, and :func:`~ai_saas_middleware.budgets.from_picodollars` reads it back as an
exact ``Decimal``. One event can cost up to about 9.2 million USD; a tenant's monthly sum
is added up in Python (exact at any size).

Tenant-scoped tables (:data:`TENANT_TABLES`) carry a ``tenant_id`` column; on PostgreSQL
each has a row-level security policy (see :mod:`.migrations`).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Index, Integer, MetaData, String, Table, Text

__all__ = ["TENANT_TABLES", "billing_log", "metadata", "pricing_versions", "rejected_events",
           "schema_version", "stripe_deliveries", "tenant_flags", "usage_daily",
           "usage_events"]

metadata = MetaData()

Money = BigInteger  # picodollars

schema_version = Table(
    "ai_saas_schema", metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", String(32), nullable=False),
)

usage_events = Table(
    "usage_events", metadata,
    # One row per AI request, forever: the key every replay and redelivery meets.
    Column("request_id", String(128), primary_key=True),
    Column("tenant_id", String(64), nullable=False),
    Column("tier", String(64), nullable=False),
    Column("model_id", String(200), nullable=False),
    Column("provider", String(100), nullable=False),
    Column("period", String(7), nullable=False),  # YYYY-MM of ts
    Column("day", String(10), nullable=False),  # YYYY-MM-DD of ts
    Column("ts", String(32), nullable=False),  # ISO-8601 UTC, as the event carries it
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("usage_source", String(16), nullable=False),
    Column("cost_p", Money, nullable=False),  # inference cost
    Column("revenue_p", Money, nullable=False),  # what the tenant is charged
    Column("saved_p", Money, nullable=False),  # inference cost a cache hit saved
    Column("outcome_p", Money, nullable=True),  # outcome_value x 10^12, when reported
    Column("status", Integer, nullable=False),
    Column("latency_ms", Integer, nullable=False),
    Column("cache", String(8), nullable=False),
    Column("fallback_from", String(200), nullable=False),
    Column("endpoint", String(200), nullable=False),
    Column("truncated", Boolean, nullable=False),
    Column("client_disconnected", Boolean, nullable=False),
    Column("price_version", Integer, nullable=False),  # the model prices' version
    Column("pricing_version", Integer, nullable=False),  # the pricing rules' version
    Column("stream_id", String(200), nullable=False),  # '<stream key> <entry id>'
    Column("recorded_at", String(32), nullable=False),
    # The Stripe meter event that carried this usage (NULL: not gathered yet).
    Column("delivery", String(100), nullable=True),
)
Index("usage_events_tenant_period", usage_events.c.tenant_id, usage_events.c.period)
Index("usage_events_undelivered", usage_events.c.tenant_id,
      sqlite_where=usage_events.c.delivery.is_(None),
      postgresql_where=usage_events.c.delivery.is_(None))

usage_daily = Table(
    "usage_daily", metadata,
    # Per tenant x day x model, updated in the transaction that inserts the rows it sums.
    Column("tenant_id", String(64), primary_key=True),
    Column("day", String(10), primary_key=True),
    Column("model_id", String(200), primary_key=True),
    Column("period", String(7), nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),  # status >= 400
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("cost_p", Money, nullable=False),
    Column("revenue_p", Money, nullable=False),
    Column("cache_hits", BigInteger, nullable=False),
    Column("saved_p", Money, nullable=False),
    Column("outcome_p", Money, nullable=False),
    Column("outcomes", BigInteger, nullable=False),  # events that reported an outcome_value
)
Index("usage_daily_period", usage_daily.c.period, usage_daily.c.tenant_id)

pricing_versions = Table(
    "pricing_versions", metadata,
    Column("version", Integer, primary_key=True, autoincrement=True),
    Column("digest", String(64), nullable=False, unique=True),  # sha256 of `rules`
    Column("rules", Text, nullable=False),  # canonical JSON of what priced
    Column("created_at", String(32), nullable=False),
)

tenant_flags = Table(
    "tenant_flags", metadata,
    # A tenant whose margin in a month fell below a billing.marginRules threshold.
    Column("tenant_id", String(64), primary_key=True),
    Column("period", String(7), primary_key=True),
    Column("rule", Integer, nullable=False),  # index in billing.marginRules
    Column("margin", String(40), nullable=False),  # the margin seen, a decimal string
    Column("pricing_version", Integer, nullable=True),  # switched to, from then on
    Column("flagged_at", String(32), nullable=False),
)

stripe_deliveries = Table(
    "stripe_deliveries", metadata,
    # One Stripe meter event: the usage of `tenant_id` gathered into it, sent until
    # Stripe has it. The identifier is derived from the request ids it carries.
    Column("identifier", String(100), primary_key=True),
    Column("tenant_id", String(64), nullable=False),
    Column("customer", String(255), nullable=False),
    Column("event_name", String(100), nullable=False),
    Column("period", String(7), nullable=False),
    Column("value", BigInteger, nullable=False),
    Column("timestamp", BigInteger, nullable=False),  # unix seconds, as Stripe takes it
    Column("events", Integer, nullable=False),
    Column("state", String(12), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("delivered_at", String(32), nullable=True),
    Column("last_error", Text, nullable=True),
)
Index("stripe_deliveries_state", stripe_deliveries.c.state)

rejected_events = Table(
    "rejected_events", metadata,
    # Stream entries that are not valid usage events: kept, never silently dropped.
    Column("stream_id", String(200), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("raw", Text, nullable=False),
    Column("rejected_at", String(32), nullable=False),
)

billing_log = Table(
    "billing_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", String(32), nullable=False),
    Column("action", String(40), nullable=False),
    Column("detail", Text, nullable=False),
)

TENANT_TABLES = (usage_events, usage_daily, tenant_flags, stripe_deliveries)
