"""Who is calling: tenants named by a trusted resolver, API keys, stored tenants' tiers.

Credentials come, in this order, from the app's tenant resolver (``RequestInfo.tenant_id``),
the ``http.tenantHeader`` if one is configured, then ``X-API-Key`` or
``Authorization: Bearer``. A key is only ever held as its SHA-256 (:func:`hash_api_key`):
the config's tenants are looked up by it here; a Redis-stored tenant's key
(``ais_<32 hex>_<tenant>``, :func:`new_stored_key`) names its tenant and admit.lua checks
its hash. No I/O: what Redis says of a stored tenant (its tier, whether its key is valid)
comes back through :meth:`Credentials.confirmed`, :meth:`Credentials.learn_tier` and
:meth:`Credentials.refused`.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from .config import Config, TenantConfig, TierConfig
from .responses import refusal
from .store.keys import is_valid_tenant_id
from .types import Decision, RequestInfo

__all__ = ["STORED_KEY_PREFIX", "Caller", "Credentials", "hash_api_key", "new_stored_key",
           "stored_key_tenant"]

STORED_KEY_PREFIX = "ais_"
_STORED_KEY_SECRET = 32  # hex digits of a stored tenant's key, before "_<tenant>"
_TIER_TTL_S = 300.0  # how long a stored tenant's tier is trusted before it is rechecked


def hash_api_key(key: str) -> str:
    """The hex SHA-256 of an API key, as config (``sha256:<hex>``) and Redis store it."""
    return hashlib.sha256(key.encode()).hexdigest()


def stored_key_tenant(key: str) -> str | None:
    """The tenant id a stored-tenant key (``ais_<32 hex>_<tenant>``) names, if well formed."""
    n = len(STORED_KEY_PREFIX) + _STORED_KEY_SECRET
    if not key.startswith(STORED_KEY_PREFIX) or len(key) < n + 2 or key[n] != "_":
        return None
    secret = key[len(STORED_KEY_PREFIX):n]
    if any(c not in "0123456789abcdef" for c in secret):
        return None
    return key[n + 1:]


def new_stored_key(tenant_id: str) -> str:
    """A fresh API key for a Redis-stored tenant. Shown once; only its hash is kept."""
    return f"{STORED_KEY_PREFIX}{secrets.token_hex(_STORED_KEY_SECRET // 2)}_{tenant_id}"


class Caller:
    """Who a request comes from, as its credentials tell (internal, mutable).

    ``mode`` is how admit.lua / usage.lua are to check the tenant: ``static`` (a tenant
    of the config, nothing to check), ``key`` (a stored tenant's key, whose hash is
    ``key_hash``) or ``stored`` (a stored tenant named by the resolver or the tenant
    header). ``tier`` is unset for a stored tenant until :meth:`Credentials.stored_tier`
    or Redis tells it.
    """

    __slots__ = ("key_hash", "mode", "stored", "tenant_id", "tier")

    tenant_id: str
    tier: TierConfig
    mode: str  # static | key | stored (see admit.lua)
    key_hash: str
    stored: bool

    def __init__(self) -> None:
        self.mode = "static"
        self.key_hash = ""
        self.stored = False


class Credentials:
    """The config's tenants by key hash, and what this process learnt of stored tenants."""

    def __init__(self, config: Config):
        self._tenants = config.tenants
        self._tiers = config.tiers
        self._tenant_header = config.http.tenant_header
        self._key_index: dict[str, TenantConfig] = {
            digest: tenant for tenant in config.tenants.values()
            for digest in tenant.api_key_hashes
        }
        self._stored_tiers: dict[str, tuple[str, float]] = {}  # tenant -> (tier, until)
        self._verified_keys: dict[str, str] = {}  # key hash -> stored tenant, for outages

    def authenticate(self, info: RequestInfo, caller: Caller) -> Decision | None:
        """Fill ``caller`` from the request's credentials; a refusal when they are none
        or malformed, or name no tenant of the config that could be a stored one."""
        tenant_id = info.tenant_id
        if tenant_id is not None and not isinstance(tenant_id, str):
            raise TypeError("a tenant resolver must return a tenant id (str) or None, not "
                            f"{type(tenant_id).__name__}")
        if tenant_id is None and self._tenant_header is not None:
            tenant_id = info.headers.get(self._tenant_header)
        if tenant_id is not None:
            if not is_valid_tenant_id(tenant_id):
                return refusal("invalid_tenant_id",
                               "tenant id must be 1 to 64 characters of [A-Za-z0-9_.-]")
            static = self._tenants.get(tenant_id)
            caller.tenant_id = tenant_id
            if static is None:
                caller.mode, caller.stored = "stored", True
            else:
                caller.tier = self._tiers[static.tier]
            return None
        key = info.headers.get("x-api-key")
        if key is None:
            auth = info.headers.get("authorization", "")
            scheme, _, credentials = auth.partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                key = credentials.strip()
        if not key:
            return refusal("missing_api_key", "no API key: send 'Authorization: Bearer <key>' "
                                              "or 'X-API-Key: <key>'")
        digest = hash_api_key(key)
        static = self._key_index.get(digest)
        if static is not None:
            caller.tenant_id = static.id
            caller.tier = self._tiers[static.tier]
            return None
        tenant_id = stored_key_tenant(key)
        if tenant_id is None or not is_valid_tenant_id(tenant_id) or tenant_id in self._tenants:
            return refusal("invalid_api_key", "the API key is not valid")
        caller.tenant_id, caller.mode, caller.key_hash, caller.stored = (tenant_id, "key",
                                                                         digest, True)
        return None

    def stored_tier(self, tenant_id: str) -> TierConfig | None:
        """The tier this process last learnt for a stored tenant, while it is trusted."""
        known = self._stored_tiers.get(tenant_id)
        if known is None or known[1] < time.monotonic():
            return None
        return self._tiers.get(known[0])

    def learn_tier(self, tenant_id: str, tier: str) -> None:
        """Redis told a stored tenant's tier: trusted for the next few minutes."""
        self._stored_tiers[tenant_id] = (tier, time.monotonic() + _TIER_TTL_S)

    def confirmed(self, caller: Caller) -> None:
        """admit.lua accepted the caller: a stored tenant's tier (and key) are known good."""
        if caller.stored:
            self.learn_tier(caller.tenant_id, caller.tier.name)
            if caller.key_hash:
                self._verified_keys[caller.key_hash] = caller.tenant_id

    def verified(self, caller: Caller) -> bool:
        """Whether the caller's credentials may be trusted without Redis (an outage): a
        stored tenant's key only once Redis has accepted it in this process."""
        return not caller.key_hash or self._verified_keys.get(caller.key_hash) == caller.tenant_id

    def refused(self, caller: Caller, reply: list[Any]) -> Decision:
        """The refusal for admit.lua's / usage.lua's codes 3 (key) and 4 (no tenant)."""
        if int(reply[0]) == 3:
            self._verified_keys.pop(caller.key_hash, None)
            if reply[2] == b"revoked":
                return refusal("revoked_api_key", "the API key has been revoked")
            return refusal("invalid_api_key", "the API key is not valid")
        self._stored_tiers.pop(caller.tenant_id, None)
        if caller.mode == "key":
            return refusal("invalid_api_key", "the API key is not valid")
        return refusal("unknown_tenant", f"no tenant {caller.tenant_id!r}")
