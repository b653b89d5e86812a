"""The billing pipeline: the worker, the SQL ledger, pricing, Stripe, reports.

Needs the ``billing`` extra (SQLAlchemy, stripe); PostgreSQL also the ``postgres`` extra.
"""
