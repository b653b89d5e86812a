"""The response cache in the request path: what a request asks of it, and the Redis calls.

No I/O: :class:`ResponseCache` builds the calls (the exact lookup's arguments for
admit.lua, ``cache_lookup.lua``, ``cache_fetch.lua``, ``cache_store.lua``) and reads their
replies; the gateway twins run them. One request's state is a :class:`CachePlan`, on the
admission plan and then on the context (``ctx.cache``).

Round trips of an AI request with the cache on for it (admit.lua and settle.lua are the
two every request makes):

==================================  ====================================================
exact hit                           admit.lua answers the entry: 2 (admit, settle)
exact miss, partition empty         2: the store is pipelined with settle.lua
exact miss, semantic lookup misses  3: + cache_lookup.lua
semantic hit                        3: the body rides in the lookup's reply (the touch
                                    pipelined with settle.lua); 4 when the chosen
                                    entry's body was not among those (+ cache_fetch.lua)
==================================  ====================================================

A semantic hit takes its body from the lookup's reply when the entry the client chose is
among the few the script ranked likeliest (:data:`SPECULATIVE_BODIES`, bodies up to
:data:`SPECULATIVE_MAX_BYTES`); otherwise ``cache_fetch.lua`` reads it (a fourth round
trip, measured rare: benchmarks/README.md). The served entry's use is recorded by
``cache_touch.lua``, pipelined with the settlement.

Imported only when ``cache.enabled`` is true (it needs numpy: the ``cache`` extra).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ..config import Config, EndpointConfig, ModelProfile, TierConfig
from ..errors import ConfigError, ConfigProblem
from ..pricing import cost_of
from ..store.keys import KeySchema, TenantKeys
from .request_key import cacheable, request_keys
from .serve import MAX_CAPTURE_BYTES, CapturingMeter, entry_body, hit_body

if TYPE_CHECKING:
    from ..context import RequestContext, Ticket
    from ..types import Outcome

__all__ = ["CacheHit", "CachePlan", "ResponseCache", "cache_control"]

log = logging.getLogger("ai_saas_middleware")

MAX_CANDIDATES = 32  # entries a semantic lookup scores at most
WHOLE_PARTITION = 64  # a partition this small is scored whole (no LSH)
BUCKET_READ = 128  # members read from one LSH bucket at most
SPECULATIVE_BODIES = 1  # bodies a lookup returns with its candidates (the likeliest)
SPECULATIVE_MAX_BYTES = 16 * 1024  # a larger body is fetched when chosen (cache_fetch.lua)
LSH_TABLES, LSH_BITS = 16, 10  # see cache/lsh.py and benchmarks/README.md, Issue 11
_NO_PARTITION = "-"


def cache_control(headers: Mapping[str, str]) -> tuple[bool, bool]:
    """(lookup allowed, store allowed) by the request's ``Cache-Control``:
    ``no-cache`` skips the lookup, ``no-store`` the storing."""
    value = headers.get("cache-control")
    if not value:
        return True, True
    tokens = {t.strip().split("=", 1)[0].lower() for t in value.split(",")}
    return "no-cache" not in tokens, "no-store" not in tokens


@dataclass(slots=True)
class CacheHit:
    """What a hit serves and bills."""

    body: bytes  # the stored completion JSON
    content_type: str  # of what the hit answers: the JSON, or its SSE replay
    response: bytes
    prompt_tokens: int  # the stored entry's
    completion_tokens: int
    kind: str  # exact | semantic
    saved_cost: Decimal  # the entry's tokens at the request's model's current prices


@dataclass(slots=True, eq=False)
class CachePlan:
    """One request's business with the cache (internal, mutable)."""

    keys: TenantKeys
    entry_id: str
    partition_id: str  # '-' when the request has no semantic text
    text: str | None  # the last user message, compared by meaning
    lookup: bool  # may be answered from the cache (no Cache-Control: no-cache)
    store: bool  # may be stored (no no-store; the app may set it False: ctx.cache.store)
    stream: bool
    include_usage: bool
    partition_size: int = -1  # as admit.lua saw it; -1: unknown
    vector: Any = None
    codes: list[str] | None = None
    hit: CacheHit | None = None
    touch: str | None = None  # the entry whose use the settlement records (cache_touch.lua)
    captured: tuple[bool, bytes] | None = None  # (is SSE, body) of a complete 2xx response
    capture_limit: int = MAX_CAPTURE_BYTES

    def keep(self, is_sse: bool, body: bytes, status: int) -> None:
        if 200 <= status < 300:
            self.captured = (is_sse, body)

    def meter(self) -> CapturingMeter:
        """A response meter that also keeps a storable response for this plan."""
        return CapturingMeter(self.keep, self.capture_limit)


class ResponseCache:
    """The deployment's cache settings, embedder and hasher.

    Raises:
        ConfigError: the embedder cannot be loaded (its extra is missing), naming the
            ``pip install`` that brings it.
    """

    def __init__(self, config: Config, keys: KeySchema):
        cfg = config.cache
        self.cfg = cfg
        self.keys = keys
        try:
            from .embedders import get_embedder
            from .lsh import SignHasher
            from .match import CandidateSet, find_match

            self.embedder = get_embedder(cfg.embedder)
        except ImportError as exc:
            raise ConfigError([ConfigProblem(
                "cache.embedder" if cfg.embedder != "ngram" else "cache.enabled",
                f"the cache's dependencies installed ({exc})",
                "them missing")], config.source) from None
        self._candidates = CandidateSet
        self._find_match = find_match
        self.hasher = SignHasher(self.embedder.dim, LSH_TABLES, LSH_BITS)
        self.threshold = cfg.similarity_threshold
        self.ttl_s = max(1, int(cfg.ttl_s))
        self.mode = "quota" if cfg.count_towards_quota else "free"
        # A second opinion on semantic matches (cache.guard.Verifier), after the lexical
        # guard: ``gateway.admission.cache.verifier = ...``. Runs in the request path.
        self.verifier: Any = None
        self._space = f"{self.embedder.embedder_id}|{self.hasher.version}"
        self._candidate_head = self.embedder.embedder_id.encode() + b"\n"

    # ---------------------------------------------------------------- before Redis

    @staticmethod
    def applies(endpoint: EndpointConfig, tier: TierConfig) -> bool:
        """Is the cache on for this endpoint and tier (``cache: false`` on either: no)."""
        return endpoint.cache is not False and tier.cache is not False

    def plan(self, tenant_id: str, endpoint: EndpointConfig, model: ModelProfile,
             body: Mapping[str, Any], headers: Mapping[str, str]) -> CachePlan | None:
        """The request's cache plan; None when the cache has nothing to do with it (not
        cacheable, or both lookup and store refused by ``Cache-Control``)."""
        lookup, store = cache_control(headers)
        if not (lookup or store) or not cacheable(body).cacheable:
            return None
        try:
            rk = request_keys(body, tenant_id=tenant_id, endpoint=endpoint.path,
                              model_class=model.id)
        except ValueError:
            return None
        partition = _NO_PARTITION
        if rk.semantic_text:
            partition = hashlib.sha256(
                f"{rk.partition_key}|{self._space}".encode()).hexdigest()[:32]
        options = body.get("stream_options")
        return CachePlan(keys=self.keys.tenant(tenant_id), entry_id=rk.exact_key[:32],
                         partition_id=partition, text=rk.semantic_text or None,
                         lookup=lookup, store=store, stream=body.get("stream") is True,
                         include_usage=isinstance(options, Mapping)
                         and options.get("include_usage") is True,
                         capture_limit=min(MAX_CAPTURE_BYTES, self.cfg.max_bytes_per_tenant))

    def admit_extra(self, plan: CachePlan) -> tuple[list[str], list[Any]]:
        """admit.lua's extra KEYS (6-8) and ARGV (17-19) for the exact lookup."""
        k = plan.keys
        return ([k.cache_entry(plan.entry_id), k.cache_lru, k.cache_partition(plan.partition_id)],
                ["", self.mode, plan.entry_id])

    # ---------------------------------------------------------------- the semantic path

    def wants_lookup(self, plan: CachePlan) -> bool:
        """After an exact miss: is a semantic lookup worth its round trip?"""
        return (plan.lookup and plan.text is not None and plan.partition_size != 0)

    def _embed(self, plan: CachePlan) -> None:
        if plan.vector is None and plan.text is not None:
            plan.vector = self.embedder.embed([plan.text])[0]
            plan.codes = self.hasher.codes(plan.vector)

    def lookup_call(self, plan: CachePlan) -> tuple[str, list[str], list[Any]]:
        """The cache_lookup.lua call (embeds the text, ~30-50 us with ``ngram``)."""
        self._embed(plan)
        k = plan.keys
        codes = plan.codes or []
        return ("cache_lookup",
                [k.cache_partition(plan.partition_id),
                 *(k.cache_bucket(plan.partition_id, t, c) for t, c in enumerate(codes))],
                [k.cache_base, MAX_CANDIDATES, WHOLE_PARTITION, BUCKET_READ,
                 SPECULATIVE_BODIES, SPECULATIVE_MAX_BYTES])

    def choose(self, plan: CachePlan, reply: Any) -> tuple[str | None, list[Any] | None]:
        """(the entry id the lookup's candidates offer as a match, if any (guard
        included), and its (body, pt, ct, model) when the reply carried them, else
        None: then :meth:`fetch_call` reads them). Candidates of another embedder are
        never compared."""
        entry_id = self._choose(plan, reply)
        if entry_id is None:
            return None, None
        bodies = reply[1] if isinstance(reply[1], list) else []
        for i in range(0, len(bodies) - 4, 5):
            if bodies[i] == entry_id.encode():
                plan.touch = entry_id
                return entry_id, bodies[i + 1:i + 5]
        return entry_id, None

    def _choose(self, plan: CachePlan, reply: Any) -> str | None:
        if not isinstance(reply, list) or len(reply) < 4 or plan.text is None:
            return None
        head = self._candidate_head
        start, end = len(head), len(head) + self.embedder.dim * 4
        ids: list[str] = []
        texts: list[str] = []
        vectors: list[bytes] = []
        for i in range(2, len(reply) - 1, 2):
            entry_id, candidate = reply[i], reply[i + 1]
            if not isinstance(candidate, bytes) or not candidate.startswith(head) or len(
                    candidate) < end:
                continue  # another embedder's vector (or a corrupt one): never compared
            ids.append(entry_id.decode())
            vectors.append(candidate[start:end])
            texts.append(candidate[end:].decode("utf-8", "replace"))
        if not ids:
            return None
        candidates = self._candidates.from_buffer(self.embedder.embedder_id, ids, texts,
                                                  b"".join(vectors), self.embedder.dim)
        match = self._find_match(plan.vector, plan.text, candidates, embedder=self.embedder,
                                 threshold=self.threshold, verifier=self.verifier)
        return match.entry_id if match is not None else None

    def fetch_call(self, plan: CachePlan, entry_id: str) -> tuple[str, list[str], list[Any]]:
        k = plan.keys
        return ("cache_fetch", [k.cache_entry(entry_id), k.cache_lru], [entry_id])

    def touch_call(self, plan: CachePlan) -> tuple[str, list[str], list[Any]] | None:
        """The cache_touch.lua call that records the use of the entry a hit served from
        the lookup's reply (pipelined with the settlement), else None."""
        if plan.hit is None or plan.touch is None:
            return None
        return ("cache_touch", [plan.keys.cache_lru], [plan.touch])

    # ---------------------------------------------------------------- a hit

    def hit(self, plan: CachePlan, fields: list[Any], kind: str, model: ModelProfile
            ) -> CacheHit | None:
        """The hit an entry's (body, pt, ct, model) make; None for a malformed entry."""
        try:
            body = bytes(fields[0])
            prompt, completion = int(fields[1]), int(fields[2])
            content_type, response = hit_body(body, stream=plan.stream,
                                              include_usage=plan.include_usage)
        except (TypeError, ValueError, IndexError, AttributeError):
            return None  # (not replayable: served as a miss)
        found = CacheHit(body, content_type, response, prompt, completion, kind,
                         cost_of(model, prompt, completion))
        plan.hit = found
        return found

    def response(self, plan: CachePlan) -> tuple[str, bytes]:
        """(content type, body) of the plan's hit."""
        assert plan.hit is not None
        return plan.hit.content_type, plan.hit.response

    # ---------------------------------------------------------------- after a miss

    def store_call(self, plan: CachePlan, ticket: Ticket, ctx: RequestContext,
                   outcome: Outcome, tokens: tuple[int, int]
                   ) -> tuple[str, list[str], list[Any]] | None:
        """The cache_store.lua call for a miss's response; None when it is not to be
        stored (no-store, the app said no, an error, a truncated or failed response, or
        not a complete chat completion); for a hit, the touch of its entry when the
        lookup served it (:meth:`touch_call`), else None."""
        if plan.hit is not None:
            return self.touch_call(plan)
        if (not plan.store or plan.captured is None
                or ctx.failed or ctx.truncated or outcome.failed or outcome.disconnected
                or not 200 <= outcome.status < 300):
            return None
        body = entry_body(*plan.captured)
        plan.captured = None
        if body is None:
            return None
        model = ctx.answered_by or ctx.model
        fields: list[Any] = ["body", body, "pt", tokens[0], "ct", tokens[1],
                             "model", model.id, "emb", self.embedder.embedder_id]
        k = plan.keys
        keys = [k.cache_entry(plan.entry_id), k.cache_lru, k.cache_sizes, k.cache_bytes]
        codes: list[str] = []
        if plan.text is not None:
            self._embed(plan)
            codes = plan.codes or []
            # What a lookup reads of an entry, in one field: the embedder's id, the
            # vector, the text (cache_lookup.lua's one HGET an entry).
            fields += ["cand", self._candidate_head + plan.vector.astype("<f4").tobytes()
                       + plan.text.encode()]
            keys.append(k.cache_partition(plan.partition_id))
            keys += [k.cache_bucket(plan.partition_id, t, c) for t, c in enumerate(codes)]
        # The fields, and what Redis spends on each set membership and record (measured
        # with MEMORY USAGE: 130-190 bytes a bucket membership; benchmarks/README.md).
        size = (sum(len(f) if isinstance(f, bytes) else len(str(f)) for f in fields)
                + 150 * (len(codes) + 3) + 200)
        return ("cache_store", keys,
                [plan.entry_id, self.ttl_s, self.cfg.max_entries_per_tenant,
                 self.cfg.max_bytes_per_tenant, size, plan.partition_id, " ".join(codes),
                 k.cache_base, *fields])
