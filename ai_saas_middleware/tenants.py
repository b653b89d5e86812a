"""Tenants stored in Redis, for deployments with more tenants than a config file holds.

A stored tenant's API key has the form ``ais_<32 hex>_<tenant id>``: the tenant id in
the key lets admission find the tenant's keys (one hash tag, one round trip) and check
in the same script that the key's SHA-256 is an active key of that tenant. Only the
hash is stored; the key is shown once, when it is made.

Tenants in the configuration file take precedence over stored ones with the same id;
they are changed by editing the file, not with these commands.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import Config
from .credentials import hash_api_key, new_stored_key, stored_key_tenant
from .errors import AISaaSError, UnknownTenant
from .store.keys import KeySchema, is_valid_tenant_id
from .store.redis import RedisStore

__all__ = ["StoredTenant", "TenantAdmin"]


@dataclass(frozen=True, slots=True)
class StoredTenant:
    id: str
    tier: str
    status: str
    active_keys: int
    revoked_keys: int
    stripe_customer_id: str | None
    created: str


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TenantAdmin:
    """Create, list and change Redis-stored tenants (admin paths; not the request path)."""

    def __init__(self, config: Config, store: RedisStore):
        self.config = config
        self.store = store
        self.keys = KeySchema(config.redis.key_prefix, config.redis.shards)

    def _check_id(self, tenant_id: str) -> None:
        if not is_valid_tenant_id(tenant_id):
            raise AISaaSError(f"tenant id must be 1 to 64 characters of [A-Za-z0-9_.-], "
                              f"found {tenant_id!r}")

    def _check_tier(self, tier: str) -> None:
        if tier not in self.config.tiers:
            raise AISaaSError(f"tier must be one of {', '.join(self.config.tiers)}, "
                              f"found {tier!r}")

    def _exists(self, tenant_id: str) -> bool:
        return bool(self.store.call("EXISTS", self.keys.tenant(tenant_id).record))

    def add(self, tenant_id: str, tier: str, stripe_customer_id: str | None = None) -> str:
        """Store a new tenant; returns its first API key (shown once, never stored)."""
        self._check_id(tenant_id)
        self._check_tier(tier)
        if tenant_id in self.config.tenants:
            raise AISaaSError(f"tenant {tenant_id!r} is defined in the configuration file")
        keys = self.keys.tenant(tenant_id)
        fields = ["tier", tier, "status", "active",
                  "created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())]
        if stripe_customer_id:
            fields += ["stripe_customer_id", stripe_customer_id]
        # HSETNX on the tier makes creation race-free: the first of two adds wins.
        if not self.store.call("HSETNX", keys.record, "tier", tier):
            raise AISaaSError(f"tenant {tenant_id!r} already exists; use 'add-key' for "
                              "another key")
        self.store.call("HSET", keys.record, *fields)
        self.store.call("SADD", self.keys.tenant_index(keys.shard), tenant_id)
        return self.add_key(tenant_id)

    def add_key(self, tenant_id: str) -> str:
        """A new active key for a stored tenant; returns the key (shown once)."""
        self._check_id(tenant_id)
        if not self._exists(tenant_id):
            raise UnknownTenant(f"no stored tenant {tenant_id!r}")
        key = new_stored_key(tenant_id)
        self.store.call("HSET", self.keys.tenant(tenant_id).api_keys, hash_api_key(key),
                        "active")
        return key

    def set_tier(self, tenant_id: str, tier: str) -> None:
        self._check_id(tenant_id)
        self._check_tier(tier)
        if not self._exists(tenant_id):
            raise UnknownTenant(f"no stored tenant {tenant_id!r}")
        self.store.call("HSET", self.keys.tenant(tenant_id).record, "tier", tier)

    def revoke_key(self, key_or_hash: str, tenant_id: str | None = None) -> str:
        """Revoke a key, given the key itself or ``sha256:<hex>`` with its tenant.

        Returns the tenant id. Raises when the key is not an active key of the tenant.
        """
        if key_or_hash.startswith("sha256:"):
            if tenant_id is None:
                raise AISaaSError("revoking by hash needs --tenant")
            digest = key_or_hash[len("sha256:"):]
        else:
            tenant_id = stored_key_tenant(key_or_hash)
            if tenant_id is None:
                raise AISaaSError("that is not a stored-tenant key (ais_<32 hex>_<tenant>)")
            digest = hash_api_key(key_or_hash)
        self._check_id(tenant_id)
        slot = self.keys.tenant(tenant_id).api_keys
        if _text(self.store.call("HGET", slot, digest) or b"") != "active":
            raise AISaaSError(f"no active key with that hash for tenant {tenant_id!r}")
        self.store.call("HSET", slot, digest, "revoked")
        return tenant_id

    def get(self, tenant_id: str) -> StoredTenant:
        self._check_id(tenant_id)
        keys = self.keys.tenant(tenant_id)
        raw = self.store.call("HGETALL", keys.record)
        if not raw:
            raise UnknownTenant(f"no stored tenant {tenant_id!r}")
        record: Mapping[str, str] = {_text(k): _text(v) for k, v in
                                     (raw.items() if isinstance(raw, dict) else
                                      zip(raw[::2], raw[1::2], strict=True))}
        states = [_text(v) for v in self.store.call("HVALS", keys.api_keys)]
        return StoredTenant(tenant_id, record.get("tier", ""), record.get("status", "active"),
                            states.count("active"), states.count("revoked"),
                            record.get("stripe_customer_id"), record.get("created", ""))

    def list(self) -> list[StoredTenant]:
        ids: list[str] = []
        for shard in range(self.keys.shards):
            ids += [_text(x) for x in self.store.call("SMEMBERS", self.keys.tenant_index(shard))]
        return [self.get(tenant_id) for tenant_id in sorted(ids)]
