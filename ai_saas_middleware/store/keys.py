"""The one place Redis key names are built.

Every key of one tenant, and the usage stream shard that tenant writes to, carry the
same hash tag ``{s<shard>}``, so each Lua script touches a single cluster slot and the
same code runs on one Redis server or on a Redis Cluster::

    <prefix>:{s<shard>}:t:<tenant>:rl             rate-limit log (sorted set)
    <prefix>:{s<shard>}:t:<tenant>:q:<YYYY-MM>    monthly token counter
    <prefix>:{s<shard>}:t:<tenant>:tenant         stored tenant record (hash)
    <prefix>:{s<shard>}:t:<tenant>:keys           stored tenant's API key hashes (hash)
    <prefix>:{s<shard>}:t:<tenant>:ev:<request>   settled-request marker (dedupe, expires)
    <prefix>:{s<shard>}:t:<tenant>:res            reservations in flight (sorted set:
                                                  '<request> <tokens> <YYYY-MM>' [' <pUSD>
                                                  <YYYY-MM-DD>'] -> lease deadline, ms)
    <prefix>:{s<shard>}:t:<tenant>:b:m:<YYYY-MM>  money spent in a month, picodollars
    <prefix>:{s<shard>}:t:<tenant>:b:d:<YYYY-MM-DD>  money spent in a day (UTC)
    <prefix>:{s<shard>}:t:<tenant>:c:e:<entry>    cached response (hash: body, pt, ct, model,
                                                  emb, cand = embedder id + vector + text;
                                                  expires: cache.ttl)
    <prefix>:{s<shard>}:t:<tenant>:c:lru          cached entries by last use (sorted set, ms)
    <prefix>:{s<shard>}:t:<tenant>:c:sz           entry -> '<bytes> <partition> <codes>'
                                                  (what eviction must remove)
    <prefix>:{s<shard>}:t:<tenant>:c:bytes        bytes the tenant's entries hold (counter)
    <prefix>:{s<shard>}:t:<tenant>:c:p:<part>     entries of one partition and embedder (set)
    <prefix>:{s<shard>}:t:<tenant>:c:l:<part>:<t>:<code>
                                                  LSH bucket: entries of the partition whose
                                                  vector has sign code <code> in table <t>
    <prefix>:{s<shard>}:usage                     usage stream of the shard
    <prefix>:{s<shard>}:tenants                   ids of stored tenants in the shard (set)

The circuit breakers are the deployment's, not a tenant's: a model's breaker is shared by
every tenant, shard and process. Their keys share the hash tag ``{breakers}`` (one slot,
read by each process's breaker thread, never by a request)::

    <prefix>:{breakers}:state                     open breakers (hash: model -> state)
    <prefix>:{breakers}:fails:<model>             a model's recent failures (sorted set)
    <prefix>:{breakers}:changed                   channel: a breaker opened or closed

The price book (run-time overrides of the model profiles, see
:mod:`~ai_saas_middleware.pricebook`) and the observed statistics of settled requests
(see :mod:`~ai_saas_middleware.observed`) are deployment data too, with no tenant in
them; each has a hash tag of its own (one slot each, read by one thread per process)::

    <prefix>:{models}:book                        overrides (hash: model -> JSON of fields)
    <prefix>:{models}:version                     the price book's version (integer)
    <prefix>:{models}:history                     every version's book (hash: version -> JSON)
    <prefix>:{models}:changed                     channel: a new version of the book
    <prefix>:{stats}:completions                  decayed completion sums (hash: endpoint
                                                  and model -> '<sum> <weight> <count>')
    <prefix>:{stats}:lat:<minute>                 one minute's latency histogram (hash:
                                                  model and bucket -> count; expires)

``shard = crc32(tenant) mod shards``: stable across processes, machines and Python
versions (``hash()`` is salted per process and would not be).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

__all__ = ["KeySchema", "TenantKeys", "is_valid_tenant_id", "reservation_member"]

# Matched whole (fullmatch): with match() and "$", "acme\n" would pass, as "$" also
# matches before a string's final newline.
_TENANT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def is_valid_tenant_id(tenant_id: str) -> bool:
    """True when ``tenant_id`` may be put in a key: [A-Za-z0-9_.-], 1 to 64 characters."""
    return _TENANT_ID.fullmatch(tenant_id) is not None


def reservation_member(request_id: str, tokens: int, month: str, picodollars: int = 0,
                       day: str = "") -> str:
    """The member of ``res`` that holds a request's reservation: its id, the tokens added
    to the counter of ``month`` at admission, and that month; with a money budget, also
    the picodollars (10^-12 USD) added to the spend of that month and of ``day``
    ('YYYY-MM-DD', the server's). admit.lua builds the same string from its arguments;
    settlement, renewal and release name the reservation by it."""
    if picodollars:
        return f"{request_id} {tokens} {month} {picodollars} {day}"
    return f"{request_id} {tokens} {month}"


@dataclass(frozen=True, slots=True)
class TenantKeys:
    """The keys of one tenant; ``base`` is ``<prefix>:{s<shard>}:t:<tenant>``."""

    tenant_id: str
    shard: int
    base: str
    stream: str

    @property
    def rate_limit(self) -> str:
        return self.base + ":rl"

    def quota(self, month: str) -> str:
        return f"{self.base}:q:{month}"

    @property
    def record(self) -> str:
        return self.base + ":tenant"

    @property
    def api_keys(self) -> str:
        return self.base + ":keys"

    @property
    def reservations(self) -> str:
        """Sorted set of the reservations in flight (:func:`reservation_member`), scored by
        their lease deadlines (ms)."""
        return self.base + ":res"

    def spent_month(self, month: str) -> str:
        """Money spent in ``month`` ('YYYY-MM'), picodollars (10^-12 USD)."""
        return f"{self.base}:b:m:{month}"

    def spent_day(self, day: str) -> str:
        """Money spent on ``day`` ('YYYY-MM-DD', UTC), picodollars."""
        return f"{self.base}:b:d:{day}"

    def settled(self, request_id: str) -> str:
        return f"{self.base}:ev:{request_id}"

    # The response cache (issue 11): every key under the tenant's base, so one tenant's
    # lookups can only ever name its own entries (one hash tag, one cluster slot).

    @property
    def cache_base(self) -> str:
        """The prefix of every cache key of the tenant (the Lua scripts build entry and
        bucket names from it: the same hash tag)."""
        return self.base + ":c:"

    def cache_entry(self, entry_id: str) -> str:
        return f"{self.base}:c:e:{entry_id}"

    @property
    def cache_lru(self) -> str:
        return self.base + ":c:lru"

    @property
    def cache_sizes(self) -> str:
        return self.base + ":c:sz"

    @property
    def cache_bytes(self) -> str:
        return self.base + ":c:bytes"

    def cache_partition(self, partition_id: str) -> str:
        return f"{self.base}:c:p:{partition_id}"

    def cache_bucket(self, partition_id: str, table: int, code: str) -> str:
        return f"{self.base}:c:l:{partition_id}:{table}:{code}"


class KeySchema:
    """Builds key names for one deployment (prefix and shard count)."""

    def __init__(self, prefix: str, shards: int):
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"key prefix must not contain braces, found {prefix!r}")
        self.prefix = prefix
        self.shards = shards
        self._cache: dict[str, TenantKeys] = {}

    def shard_of(self, tenant_id: str) -> int:
        return zlib.crc32(tenant_id.encode()) % self.shards

    def tag(self, shard: int) -> str:
        return f"{self.prefix}:{{s{shard}}}"

    def stream(self, shard: int) -> str:
        return self.tag(shard) + ":usage"

    def streams(self) -> list[str]:
        return [self.stream(s) for s in range(self.shards)]

    @property
    def breakers(self) -> str:
        return f"{self.prefix}:{{breakers}}:state"

    @property
    def breaker_channel(self) -> str:
        """Pub/sub channel on which breaker.lua announces every transition."""
        return f"{self.prefix}:{{breakers}}:changed"

    def breaker_failures(self, model_id: str) -> str:
        return f"{self.prefix}:{{breakers}}:fails:{model_id}"

    @property
    def models_book(self) -> str:
        """The price book's overrides (hash: model id -> JSON of the overridden fields)."""
        return f"{self.prefix}:{{models}}:book"

    @property
    def models_version(self) -> str:
        """The price book's version (an integer, INCR'd by every change; absent: 0)."""
        return f"{self.prefix}:{{models}}:version"

    @property
    def models_channel(self) -> str:
        """Pub/sub channel on which every new price-book version is announced."""
        return f"{self.prefix}:{{models}}:changed"

    @property
    def models_history(self) -> str:
        """Every version's whole book (hash: version -> JSON), to reproduce past prices."""
        return f"{self.prefix}:{{models}}:history"

    @property
    def stats_completions(self) -> str:
        """Observed completion tokens per endpoint and model (decayed sums, hash)."""
        return f"{self.prefix}:{{stats}}:completions"

    @property
    def stats_latency_base(self) -> str:
        """The per-minute latency histograms' keys are this plus the minute number
        (server time // 60 s); stats.lua builds them (same hash tag)."""
        return f"{self.prefix}:{{stats}}:lat:"

    def tenant_index(self, shard: int) -> str:
        return self.tag(shard) + ":tenants"

    def tenant(self, tenant_id: str) -> TenantKeys:
        """Keys of a tenant. The id must already be validated (``is_valid_tenant_id``)."""
        keys = self._cache.get(tenant_id)
        if keys is None:
            if not is_valid_tenant_id(tenant_id):
                raise ValueError(f"invalid tenant id {tenant_id!r}")
            shard = self.shard_of(tenant_id)
            keys = TenantKeys(tenant_id, shard, f"{self.tag(shard)}:t:{tenant_id}",
                              self.stream(shard))
            if len(self._cache) < 100_000:  # bounded: ids come from verified credentials
                self._cache[tenant_id] = keys
        return keys
