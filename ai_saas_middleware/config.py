"""Configuration: YAML file or dict in, frozen typed objects out.

``load_config(source)`` accepts a path to a YAML file, a ``dict`` of the same
structure, or an already loaded :class:`Config` (returned as is). Every problem is
collected and raised at once as one :class:`~ai_saas_middleware.errors.ConfigError`,
each naming its path (``tenant.tiers[1].rateLimit``), what was expected and what was
found. Prices are read as exact decimals: the YAML loader never turns ``0.00000015``
into a binary float.

The sections, all optional except that a serving deployment needs ``models``,
``endpoints`` and some tenants (see :func:`serving_gaps`)::

    tenant.tiers[]      name, monthlyQuota (tokens | unlimited), rateLimit (req/min | unlimited),
                        allowedModels, onUnavailable (open | closed, overrides redis.onUnavailable)
    routing             strategy, fallbackChain, circuitBreaker {errorThreshold, resetTimeout}
    cache               enabled, ttl, similarityThreshold, maxEntriesPerTenant,
                        maxBytesPerTenant, embedder, countTowardsQuota (see docs/cache.md);
                        endpoints[].cache and tenant.tiers[].cache turn it off (or on)
                        per endpoint and tier
    billing             provider, usageMetric, pricingRules[] {metric, rate, tier}, markup,
                        minimumPerRequest, marginRules[] {below, markup | pricingRules},
                        database (SQLAlchemy URL), stripe {...}, cac, monthlyChurn, worker {...}
                        (see docs/billing.md)
    models[]            id, provider, costPerInputToken, costPerOutputToken, maxTokens,
                        qualityScore, latencyP99Ms
    modelCatalog        path of a LiteLLM-format cost map; models[] entries may then omit
                        provider, prices and maxTokens
    tenants[]           id, tier, apiKeys ["sha256:<hex>"], stripeCustomerId, monthlyBudget,
                        dailyBudget, cac
    endpoints[]         path (glob), methods, requiredQuality, maxLatencyMs,
                        maxCostPerRequest, defaultMaxOutputTokens
    redis               url, keyPrefix, shards, onUnavailable, socketTimeout, connectTimeout,
                        retryInterval, dedupeTtl, spoolDir
    http                maxBodyBytes, tenantHeader (trusted header; off by default)
    quota               promptEstimate (estimate | upper; see ai_saas_middleware.estimate),
                        reservationTimeout (how long a reservation is held unsettled)
    providers[]         id, kind (openai | anthropic), baseUrl, apiKeyEnv (the name of an
                        environment variable, never a key), connectTimeout, readTimeout,
                        maxConnections; when present, every model's provider names one
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fnmatch import translate
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from .errors import ConfigError, ConfigProblem
from .estimate import PROMPT_ESTIMATE_MODES

__all__ = [
    "BillingConfig",
    "CacheConfig",
    "CircuitBreakerConfig",
    "Config",
    "EndpointConfig",
    "HttpConfig",
    "ModelProfile",
    "PricingRule",
    "ProviderConfig",
    "QuotaConfig",
    "RedisConfig",
    "RoutingConfig",
    "TenantConfig",
    "TierConfig",
    "describe",
    "load_config",
    "serving_gaps",
]

# Patterns that validate a whole value end in \Z, not $: $ also matches before a final
# newline, so "acme\n" would pass as a tenant id (and go into Redis keys).
TENANT_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
_KEY_HASH_RE = re.compile(r"^sha256:([0-9a-f]{64})\Z")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# The hint shows every unit of the parser's table, so it cannot leave one out.
_DURATION_EXAMPLES = {"ms": 250, "s": 30, "m": 5}
_DURATION_HINT = ("a duration with a unit (" + ", ".join(
    f"{_DURATION_EXAMPLES.get(unit, 1)}{unit}" for unit in _DURATION_UNITS if unit)
    + ") or plain seconds")
_HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
_TOP_LEVEL = "(top level)"  # the path of a problem with the document itself
_ON_UNAVAILABLE = ("open", "closed")
_STRATEGIES = ("cost_optimized", "quality_first", "latency_first")
PROVIDER_KINDS = ("openai", "anthropic")
# Where a provider of each kind is when its entry names no baseUrl.
_PROVIDER_BASE_URLS = {"openai": "https://api.openai.com/v1",
                       "anthropic": "https://api.anthropic.com"}
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
_BASE_URL_RE = re.compile(r"^https?://[^\s/?#]+[^\s?#]*\Z")


# --------------------------------------------------------------------------- objects


@dataclass(frozen=True, slots=True)
class TierConfig:
    """A service tier. ``None`` limits mean unlimited."""

    name: str
    monthly_quota: int | None
    rate_limit: int | None  # requests per minute
    allowed_models: tuple[str, ...]
    on_unavailable: str | None = None
    monthly_budget: Decimal | None = None  # USD per calendar month (UTC); None = no budget
    daily_budget: Decimal | None = None  # USD per UTC day
    cache: bool | None = None  # None: as cache.enabled says; False: never for this tier


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """What routing knows of a model. Prices are exact USD per token."""

    id: str
    provider: str
    cost_per_input_token: Decimal
    cost_per_output_token: Decimal
    max_tokens: int  # context window
    quality_score: float
    latency_p99_ms: int


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """A tenant declared in the configuration (static; Redis holds the rest)."""

    id: str
    tier: str
    api_key_hashes: tuple[str, ...] = ()  # hex SHA-256 digests, never keys
    stripe_customer_id: str | None = None
    monthly_budget: Decimal | None = None  # overrides the tier's, when set
    daily_budget: Decimal | None = None
    cac: Decimal | None = None  # customer acquisition cost (USD), overrides billing.cac


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """A path pattern that counts as an AI endpoint, with its requirements."""

    path: str
    methods: frozenset[str] | None = None  # None: every method
    required_quality: float | None = None
    max_latency_ms: int | None = None
    max_cost_per_request: Decimal | None = None
    default_max_output_tokens: int = 512
    pattern: re.Pattern[str] = field(default=re.compile(""), compare=False, repr=False)
    cache: bool | None = None  # None: as cache.enabled says; False: never on this endpoint

    def matches(self, method: str, path: str) -> bool:
        # A CORS preflight carries no credentials and runs no model: unless the endpoint
        # names OPTIONS, it passes through to the app (and its CORS middleware).
        if self.methods is None:
            if method == "OPTIONS":
                return False
        elif method not in self.methods:
            return False
        return self.pattern.match(path) is not None


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str | None = None
    key_prefix: str = "aisaas"
    shards: int = 16
    on_unavailable: str = "open"
    socket_timeout_s: float = 0.25
    connect_timeout_s: float = 0.25
    retry_interval_s: float = 2.0  # how long an unreachable Redis is left alone
    dedupe_ttl_s: int = 86400  # how long settled request ids are remembered
    spool_dir: str | None = None


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    """A model's breaker opens after ``error_threshold`` failures within ``window_s``, for
    ``reset_timeout_s``; then one probe call decides (see :mod:`.breakers`)."""

    error_threshold: int = 5
    reset_timeout_s: float = 30.0
    window_s: float = 60.0


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    strategy: str = "cost_optimized"
    fallback_chain: tuple[str, ...] = ()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    downgrade_at: Decimal | None = None  # share of quota or budget used; then the cheapest
    default_response: str | None = None  # answered when every model failed or is open
    use_observed_latency: bool = False  # rank and filter by the p99 seen in settled events


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The per-tenant response cache (see docs/cache.md)."""

    enabled: bool = False
    ttl_s: float = 3600.0
    similarity_threshold: float = 0.85  # a calibrated score (cache/calibration.py)
    max_entries_per_tenant: int = 10_000
    max_bytes_per_tenant: int = 64 * 1024 * 1024
    embedder: str = "ngram"
    count_towards_quota: bool = False  # does a hit's token count go on the quota?


PRICING_METRICS = ("input_tokens", "output_tokens", "requests")
USAGE_METRICS = ("tokens", "input_tokens", "output_tokens", "requests")
DEFAULT_LEDGER = "sqlite:///ai-saas-ledger.sqlite3"


@dataclass(frozen=True, slots=True)
class PricingRule:
    metric: str  # one of PRICING_METRICS
    rate: Decimal  # USD per unit of metric
    tier: str | None = None  # None: every tier


@dataclass(frozen=True, slots=True)
class MarginRule:
    """When a tenant's gross margin in the month falls below ``below`` (a fraction), the
    tenant is flagged; with ``markup`` or ``pricing_rules`` it is also priced that way from
    its next event on, for the rest of the month."""

    below: Decimal
    markup: Decimal | None = None
    pricing_rules: tuple[PricingRule, ...] = ()


@dataclass(frozen=True, slots=True)
class StripeConfig:
    """Where and how the worker reports usage to Stripe (Billing Meter Events)."""

    api_key_env: str = "STRIPE_API_KEY"  # the name of an environment variable, never a key
    event_name: str = "ai_usage"  # the meter's event_name
    meter_id: str | None = None  # for reconcile; found by event_name when not given
    api_base: str | None = None  # e.g. a stand-in server; default Stripe's own
    meter_events_base: str | None = None  # the v2 meter event stream's host
    interval_s: float = 10.0  # how often usage is gathered into meter events
    stream_above: int = 100  # meter events per round above which the v2 stream is used
    max_retries: int = 8


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    batch_size: int = 1000  # stream entries read and committed per transaction
    block_ms: int = 1000  # how long a read waits for new entries
    claim_idle_s: float = 30.0  # a pending entry idle this long is taken from its consumer
    trim_interval_s: float = 10.0  # how often acknowledged entries are trimmed


@dataclass(frozen=True, slots=True)
class BillingConfig:
    provider: str | None = None
    usage_metric: str = "tokens"
    pricing_rules: tuple[PricingRule, ...] = ()
    markup: Decimal | None = None  # cost-plus: price = inference cost x (1 + markup)
    minimum_per_request: Decimal | None = None
    margin_rules: tuple[MarginRule, ...] = ()
    database: str = DEFAULT_LEDGER  # an SQLAlchemy URL
    stripe: StripeConfig | None = None  # None: the worker fills the ledger only
    cac: Decimal | None = None  # customer acquisition cost, USD, for LTV/CAC
    monthly_churn: Decimal | None = None  # a fraction; None: observed
    worker: WorkerConfig = WorkerConfig()


@dataclass(frozen=True, slots=True)
class HttpConfig:
    max_body_bytes: int = 1_048_576
    tenant_header: str | None = None  # trusted only when the deployment names it


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    """How the token quota is reserved.

    ``prompt_estimate``: ``estimate`` (a safe estimate of the prompt; the counter can pass
    the quota by a bounded amount) or ``upper`` (a true upper bound: with ``max_tokens``
    passed on, the counter never passes the quota), see :mod:`ai_saas_middleware.estimate`.
    ``reservation_timeout_s``: how long a reservation is held for a request that has not
    settled it (nor renewed it) before it is released."""

    prompt_estimate: str = "estimate"
    reservation_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """A model provider the provider layer calls (:mod:`ai_saas_middleware.providers`).

    ``api_key_env`` is the *name* of the environment variable that holds the API key
    (``None``: the provider takes no key, e.g. a local Ollama); the key itself is read
    when the provider is built and is never part of the configuration. ``base_url`` has
    no trailing slash: ``{base_url}/chat/completions`` (openai) or
    ``{base_url}/v1/messages`` (anthropic). ``read_timeout_s`` bounds each wait for the
    provider's next bytes (the reply's head, each chunk of a stream), not the whole call."""

    id: str
    kind: str
    base_url: str
    api_key_env: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_connections: int = 100


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated configuration. Immutable; share it freely."""

    tiers: Mapping[str, TierConfig]
    models: Mapping[str, ModelProfile]
    tenants: Mapping[str, TenantConfig]
    endpoints: tuple[EndpointConfig, ...]
    redis: RedisConfig
    routing: RoutingConfig
    cache: CacheConfig
    billing: BillingConfig
    http: HttpConfig
    quota: QuotaConfig = QuotaConfig()
    providers: Mapping[str, ProviderConfig] = field(
        default_factory=lambda: MappingProxyType({}))
    source: str = ""

    def tier(self, name: str) -> TierConfig:
        return self.tiers[name]


# --------------------------------------------------------------------------- YAML


class _DecimalLoader(yaml.SafeLoader):
    """SafeLoader that reads every float literal as an exact Decimal."""


def _construct_decimal(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    text = str(loader.construct_scalar(node)).replace("_", "")  # type: ignore[arg-type]
    low = text.lower()
    if low in (".inf", "+.inf", "-.inf", ".nan"):
        return float(text.replace(".", "", 1))
    return Decimal(text)


_DecimalLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)


def _read_yaml(path: Path) -> Any:
    with path.open("r", encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_DecimalLoader)


# --------------------------------------------------------------------------- validation


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"boolean {value!r}"
    if isinstance(value, (int, float, Decimal)):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


_MISSING = object()


class _Reader:
    """Collects problems while reading one configuration tree."""

    def __init__(self) -> None:
        self.problems: list[ConfigProblem] = []

    def problem(self, path: str, expected: str, found: str) -> None:
        self.problems.append(ConfigProblem(path, expected, found))

    def declare(self, path: str, kind: str, **facts: Any) -> None:
        """State what a value the caller checks by hand must be (``kind``: ``string``
        with ``pattern``/``what``, ``choice`` with ``options``/``case_insensitive``,
        ``duration`` with ``minimum``). Loading ignores it; the JSON Schema's recorder
        (:mod:`ai_saas_middleware.schema`) reads it, so the schema has no rule of its own."""

    def mapping(self, value: Any, path: str, known: tuple[str, ...]) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problem(path or _TOP_LEVEL, "a mapping" if path else _SECTIONS, _kind(value))
            return {}
        for key in value:
            if key not in known:
                self.problem(f"{path}.{key}" if path else str(key),
                             "one of " + ", ".join(known), f"unknown key {key!r}")
        return value

    def items(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            self.problem(path, "a list", _kind(value))
            return []
        return list(value)

    def string(self, m: Mapping[str, Any], key: str, path: str, default: Any = _MISSING,
               pattern: re.Pattern[str] | None = None, what: str = "a string") -> Any:
        value = m.get(key, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                self.problem(f"{path}.{key}", what, "nothing")
                return None
            return default
        if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
            self.problem(f"{path}.{key}", what, _kind(value))
            return default if default is not _MISSING else None
        return value

    def integer(self, m: Mapping[str, Any], key: str, path: str, default: Any = _MISSING,
                minimum: int = 0, unlimited: bool = False) -> Any:
        value = m.get(key, _MISSING)
        what = f"a whole number >= {minimum}" + (" or 'unlimited'" if unlimited else "")
        if value is _MISSING or value is None:
            if default is _MISSING:
                self.problem(f"{path}.{key}", what, "nothing")
                return None
            return default
        if unlimited and isinstance(value, str) and value.strip().lower() == "unlimited":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, Decimal)) or value != int(value):
            self.problem(f"{path}.{key}", what, _kind(value))
            return default if default is not _MISSING else None
        if int(value) < minimum:
            self.problem(f"{path}.{key}", what, _kind(value))
            return default if default is not _MISSING else None
        return int(value)

    def decimal(self, m: Mapping[str, Any], key: str, path: str, default: Any = _MISSING,
                minimum: Decimal = Decimal(0), maximum: Decimal | None = None) -> Any:
        value = m.get(key, _MISSING)
        what = f"a decimal number >= {minimum}"
        if maximum is not None:
            what += f" and <= {maximum}"
        if value is _MISSING or value is None:
            if default is _MISSING:
                self.problem(f"{path}.{key}", what, "nothing")
                return None
            return default
        number = _to_decimal(value)
        if number is None or number < minimum or (maximum is not None and number > maximum):
            self.problem(f"{path}.{key}", what, _kind(value))
            return default if default is not _MISSING else None
        return number

    def duration(self, m: Mapping[str, Any], key: str, path: str, default: float) -> float:
        value = m.get(key, _MISSING)
        if value is _MISSING or value is None:
            return default
        seconds = _to_seconds(value)
        if seconds is None:
            self.problem(f"{path}.{key}", _DURATION_HINT, _kind(value))
            return default
        return seconds

    def boolean(self, m: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        value = m.get(key, _MISSING)
        if value is _MISSING or value is None:
            return default
        if not isinstance(value, bool):
            self.problem(f"{path}.{key}", "true or false", _kind(value))
            return default
        return value

    def choice(self, m: Mapping[str, Any], key: str, path: str, options: tuple[str, ...],
               default: Any) -> Any:
        value = m.get(key, _MISSING)
        if value is _MISSING or value is None:
            return default
        if value not in options:
            self.problem(f"{path}.{key}", "one of " + ", ".join(options), _kind(value))
            return default
        return value

    def string_list(self, m: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
        out: list[str] = []
        for i, item in enumerate(self.items(m.get(key), f"{path}.{key}")):
            if not isinstance(item, str) or not item:
                self.problem(f"{path}.{key}[{i}]", "a non-empty string", _kind(item))
            else:
                out.append(item)
        return tuple(out)


def _to_decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        return value if value.is_finite() else None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        # A float from a dict config: its shortest repr is what the user wrote.
        return Decimal(repr(value)) if value == value and abs(value) != float("inf") else None
    if isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            return None
        return number if number.is_finite() else None
    return None


def _to_seconds(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, Decimal)):
        return float(value) if value >= 0 else None
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return None


# --------------------------------------------------------------------------- sections


_TOP = ("tenant", "routing", "cache", "billing", "models", "modelCatalog", "tenants",
        "endpoints", "redis", "http", "quota", "providers")
_SECTIONS = "a mapping of configuration sections (" + ", ".join(_TOP) + ")"


def _read_tiers(r: _Reader, tenant_section: Any) -> dict[str, TierConfig]:
    section = r.mapping(tenant_section, "tenant", ("tiers",))
    tiers: dict[str, TierConfig] = {}
    for i, raw in enumerate(r.items(section.get("tiers"), "tenant.tiers")):
        path = f"tenant.tiers[{i}]"
        m = r.mapping(raw, path, ("name", "monthlyQuota", "rateLimit", "allowedModels",
                                  "onUnavailable", "monthlyBudget", "dailyBudget", "cache"))
        if not m:
            continue
        name = r.string(m, "name", path, pattern=TENANT_ID_RE,
                        what="a tier name of [A-Za-z0-9_.-], 1 to 64 characters")
        tier = TierConfig(
            name=name or "",
            monthly_quota=r.integer(m, "monthlyQuota", path, minimum=0, unlimited=True),
            rate_limit=r.integer(m, "rateLimit", path, minimum=1, unlimited=True),
            allowed_models=r.string_list(m, "allowedModels", path),
            on_unavailable=r.choice(m, "onUnavailable", path, _ON_UNAVAILABLE, None),
            monthly_budget=_budget(r, m, "monthlyBudget", path),
            daily_budget=_budget(r, m, "dailyBudget", path),
            cache=_optional_boolean(r, m, "cache", path),
        )
        if name and name in tiers:
            r.problem(f"{path}.name", "a tier name used once", f"duplicate {name!r}")
        elif name:
            tiers[name] = tier
    return tiers


def _read_catalog(r: _Reader, value: Any, base: Path | None) -> dict[str, Mapping[str, Any]]:
    what = "a path to a LiteLLM-format JSON cost map"
    r.declare("modelCatalog", "string", what=what)
    if value is None:
        return {}
    if not isinstance(value, str):
        r.problem("modelCatalog", what, _kind(value))
        return {}
    path = Path(value)
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_float=Decimal)
    except OSError as exc:
        r.problem("modelCatalog", "a readable JSON file", f"{value!r} ({exc.strerror})")
        return {}
    except ValueError as exc:
        r.problem("modelCatalog", "valid JSON", f"{value!r} ({exc})")
        return {}
    if not isinstance(data, Mapping):
        r.problem("modelCatalog", "a JSON object of model id -> prices", _kind(data))
        return {}
    return {k: v for k, v in data.items() if isinstance(v, Mapping)}


def _catalog_fields(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The profile keys a LiteLLM catalog entry fills (where the profile omits them)."""
    return {
        "provider": entry.get("litellm_provider"),
        "costPerInputToken": entry.get("input_cost_per_token"),
        "costPerOutputToken": entry.get("output_cost_per_token"),
        "maxTokens": entry.get("max_input_tokens", entry.get("max_tokens")),
    }


def _read_models(r: _Reader, value: Any, catalog: Mapping[str, Mapping[str, Any]]
                 ) -> dict[str, ModelProfile]:
    models: dict[str, ModelProfile] = {}
    for i, raw in enumerate(r.items(value, "models")):
        path = f"models[{i}]"
        m = r.mapping(raw, path, ("id", "provider", "costPerInputToken", "costPerOutputToken",
                                  "maxTokens", "qualityScore", "latencyP99Ms"))
        if not m:
            continue
        model_id = r.string(m, "id", path)
        # A LiteLLM catalog entry fills what the profile leaves out.
        merged = {k: v for k, v in _catalog_fields(catalog.get(model_id or "", {})).items()
                  if v is not None}
        merged.update({k: v for k, v in m.items() if v is not None})
        profile = ModelProfile(
            id=model_id or "",
            provider=r.string(merged, "provider", path),
            cost_per_input_token=r.decimal(merged, "costPerInputToken", path),
            cost_per_output_token=r.decimal(merged, "costPerOutputToken", path),
            max_tokens=r.integer(merged, "maxTokens", path, minimum=1),
            quality_score=float(r.decimal(merged, "qualityScore", path, maximum=Decimal(1)) or 0),
            latency_p99_ms=r.integer(merged, "latencyP99Ms", path, minimum=1),
        )
        if model_id and model_id in models:
            r.problem(f"{path}.id", "a model id used once", f"duplicate {model_id!r}")
        elif model_id:
            models[model_id] = profile
    return models


def _read_tenants(r: _Reader, value: Any, tiers: Mapping[str, TierConfig]
                  ) -> dict[str, TenantConfig]:
    tenants: dict[str, TenantConfig] = {}
    seen_keys: dict[str, str] = {}
    for i, raw in enumerate(r.items(value, "tenants")):
        path = f"tenants[{i}]"
        m = r.mapping(raw, path, ("id", "tier", "apiKeys", "stripeCustomerId",
                                  "monthlyBudget", "dailyBudget", "cac"))
        if not m:
            continue
        tenant_id = r.string(m, "id", path, pattern=TENANT_ID_RE,
                             what="a tenant id of [A-Za-z0-9_.-], 1 to 64 characters")
        tier = r.string(m, "tier", path)
        if tier is not None and tier not in tiers:
            r.problem(f"{path}.tier", "one of the tiers " + ", ".join(tiers) if tiers
                      else "a tier defined in tenant.tiers", repr(tier))
        hashes: list[str] = []
        digest_hint = "'sha256:' and 64 lowercase hex digits"
        r.declare(f"{path}.apiKeys[]", "string", pattern=_KEY_HASH_RE, what=digest_hint)
        for j, key in enumerate(r.items(m.get("apiKeys"), f"{path}.apiKeys")):
            match = _KEY_HASH_RE.match(key) if isinstance(key, str) else None
            if match is None:
                # Never echo what might be a plaintext key back into a log.
                found = ("a value that is not a sha256 digest" if isinstance(key, str)
                         else _kind(key))
                r.problem(f"{path}.apiKeys[{j}]", digest_hint, found)
                continue
            digest = match.group(1)
            if digest in seen_keys and seen_keys[digest] != tenant_id:
                r.problem(f"{path}.apiKeys[{j}]", "a key hash that belongs to one tenant",
                          f"the same hash as tenant {seen_keys[digest]!r}")
            seen_keys[digest] = tenant_id or ""
            hashes.append(digest)
        stripe = r.string(m, "stripeCustomerId", path, default=None)
        monthly = _budget(r, m, "monthlyBudget", path)
        daily = _budget(r, m, "dailyBudget", path)
        cac = r.decimal(m, "cac", path, default=None, maximum=MAX_BUDGET_USD)
        if tenant_id and tenant_id in tenants:
            r.problem(f"{path}.id", "a tenant id used once", f"duplicate {tenant_id!r}")
        elif tenant_id:
            tenants[tenant_id] = TenantConfig(tenant_id, tier or "", tuple(hashes), stripe,
                                              monthly, daily, cac)
    return tenants


# Budgets are counted in Redis in picodollars (10^-12 USD), as 64-bit integers.
MAX_BUDGET_USD = Decimal(9_000_000)
MONEY_PLACES = 12


def _budget(r: _Reader, m: Mapping[str, Any], key: str, path: str) -> Decimal | None:
    value: Decimal | None = r.decimal(m, key, path, default=None, maximum=MAX_BUDGET_USD)
    if value is not None and decimal_places(value) > MONEY_PLACES:
        r.problem(f"{path}.{key}", f"a USD amount with at most {MONEY_PLACES} decimal "
                  "places", _kind(m.get(key)))
        return None
    return value


def decimal_places(value: Decimal) -> int:
    """How many decimal places ``value`` needs (0.000100 needs 4). Read from its digits,
    not by ``normalize()``, which would round in the thread's decimal context (a host app
    may have set it to 4 digits, or to trap rounding)."""
    _sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        return 0
    trailing = len(digits) - len("".join(map(str, digits)).rstrip("0"))
    return max(0, -exponent - trailing)


def _read_endpoints(r: _Reader, value: Any) -> tuple[EndpointConfig, ...]:
    endpoints: list[EndpointConfig] = []
    for i, raw in enumerate(r.items(value, "endpoints")):
        path = f"endpoints[{i}]"
        m = r.mapping(raw, path, ("path", "methods", "requiredQuality", "maxLatencyMs",
                                  "maxCostPerRequest", "defaultMaxOutputTokens", "cache"))
        if not m:
            continue
        glob = r.string(m, "path", path, pattern=re.compile(r"^/"),
                        what="a path glob starting with '/'")
        methods = r.string_list(m, "methods", path)
        r.declare(f"{path}.methods[]", "choice", options=_HTTP_METHODS, case_insensitive=True)
        listed = m.get("methods")
        for j, method in enumerate(listed if isinstance(listed, (list, tuple)) else ()):
            # Items that are not strings were reported by string_list.
            if isinstance(method, str) and method and method.upper() not in _HTTP_METHODS:
                r.problem(f"{path}.methods[{j}]",
                          f"an HTTP method ({', '.join(_HTTP_METHODS)})", _kind(method))
        quality = r.decimal(m, "requiredQuality", path, default=None, maximum=Decimal(1))
        endpoints.append(EndpointConfig(
            path=glob or "/",
            methods=frozenset(x.upper() for x in methods) if methods else None,
            required_quality=float(quality) if quality is not None else None,
            max_latency_ms=r.integer(m, "maxLatencyMs", path, default=None, minimum=1),
            max_cost_per_request=r.decimal(m, "maxCostPerRequest", path, default=None),
            default_max_output_tokens=r.integer(m, "defaultMaxOutputTokens", path,
                                                default=512, minimum=1),
            pattern=re.compile(translate(glob or "/")),
            cache=_optional_boolean(r, m, "cache", path),
        ))
    return tuple(endpoints)


def _optional_boolean(r: _Reader, m: Mapping[str, Any], key: str, path: str) -> bool | None:
    """``true``, ``false``, or None when the key is absent. (Read in any case: the JSON
    Schema's recorder learns the key from the reader's call.)"""
    value = r.boolean(m, key, path, False)
    return None if m.get(key) is None else value


def _read_redis(r: _Reader, value: Any) -> RedisConfig:
    m = r.mapping(value, "redis", ("url", "keyPrefix", "shards", "onUnavailable",
                                   "socketTimeout", "connectTimeout", "retryInterval",
                                   "dedupeTtl", "spoolDir"))
    url = r.string(m, "url", "redis", default=None,
                   pattern=re.compile(r"^(redis|rediss|unix|redis\+cluster|rediss\+cluster)://"),
                   what="a URL starting redis://, rediss://, unix:// or redis+cluster://")
    return RedisConfig(
        url=url,
        key_prefix=r.string(m, "keyPrefix", "redis", default="aisaas",
                            pattern=re.compile(r"^[A-Za-z0-9_.:-]{1,32}\Z"),
                            what="a prefix of [A-Za-z0-9_.:-], 1 to 32 characters (no braces)"),
        shards=r.integer(m, "shards", "redis", default=16, minimum=1),
        on_unavailable=r.choice(m, "onUnavailable", "redis", _ON_UNAVAILABLE, "open"),
        socket_timeout_s=r.duration(m, "socketTimeout", "redis", 0.25),
        connect_timeout_s=r.duration(m, "connectTimeout", "redis", 0.25),
        retry_interval_s=r.duration(m, "retryInterval", "redis", 2.0),
        dedupe_ttl_s=_dedupe_ttl(r, m),
        spool_dir=r.string(m, "spoolDir", "redis", default=None),
    )


def _dedupe_ttl(r: _Reader, m: Mapping[str, Any]) -> int:
    # settle.lua writes the settled marker with SET ... EX <ttl>; under one second that is
    # EX 0, which Redis refuses after the event and the counter are written, and the
    # replay of the spooled settlement would write them again.
    seconds = r.duration(m, "dedupeTtl", "redis", 86400.0)
    r.declare("redis.dedupeTtl", "duration", minimum=1)
    if seconds < 1:
        r.problem("redis.dedupeTtl", "a duration of at least 1s (a day or more is advised)",
                  _kind(m.get("dedupeTtl")))
        return 86400
    return int(seconds)


def _read_routing(r: _Reader, value: Any) -> RoutingConfig:
    m = r.mapping(value, "routing", ("strategy", "fallbackChain", "circuitBreaker",
                                     "downgradeAt", "defaultResponse", "useObservedLatency"))
    cb = r.mapping(m.get("circuitBreaker"), "routing.circuitBreaker",
                   ("errorThreshold", "resetTimeout", "window"))
    reset = _positive_duration(r, cb, "resetTimeout", "routing.circuitBreaker", 30.0)
    window = _positive_duration(r, cb, "window", "routing.circuitBreaker", 60.0)
    downgrade = r.decimal(m, "downgradeAt", "routing", default=None, maximum=Decimal(1))
    if downgrade is not None and downgrade <= 0:
        r.problem("routing.downgradeAt", "a share of the period's quota or budget, > 0 and "
                  "<= 1 (e.g. 0.8)", _kind(m.get("downgradeAt")))
        downgrade = None
    default = r.string(m, "defaultResponse", "routing", default=None,
                       what="a string (the text answered when no model can)")
    return RoutingConfig(
        strategy=r.choice(m, "strategy", "routing", _STRATEGIES, "cost_optimized"),
        fallback_chain=r.string_list(m, "fallbackChain", "routing"),
        circuit_breaker=CircuitBreakerConfig(
            error_threshold=r.integer(cb, "errorThreshold", "routing.circuitBreaker",
                                      default=5, minimum=1),
            reset_timeout_s=reset,
            window_s=window,
        ),
        downgrade_at=downgrade,
        default_response=default,
        use_observed_latency=r.boolean(m, "useObservedLatency", "routing", False),
    )


def _positive_duration(r: _Reader, m: Mapping[str, Any], key: str, path: str,
                       default: float) -> float:
    seconds = r.duration(m, key, path, default)
    if seconds <= 0:
        r.problem(f"{path}.{key}", "a duration > 0 (e.g. 30s)", _kind(m.get(key)))
        return default
    return seconds


CACHE_EMBEDDERS = ("ngram", "minilm", "wordllama")


def _read_cache(r: _Reader, value: Any) -> CacheConfig:
    m = r.mapping(value, "cache", ("enabled", "ttl", "similarityThreshold",
                                   "maxEntriesPerTenant", "maxBytesPerTenant", "embedder",
                                   "countTowardsQuota"))
    threshold = r.decimal(m, "similarityThreshold", "cache", default=Decimal("0.85"),
                          maximum=Decimal(1))
    ttl = r.duration(m, "ttl", "cache", 3600.0)  # (entries live at least 1 s)
    r.declare("cache.embedder", "choice", options=CACHE_EMBEDDERS)
    return CacheConfig(
        enabled=r.boolean(m, "enabled", "cache", False),
        ttl_s=ttl,
        similarity_threshold=float(threshold),
        max_entries_per_tenant=r.integer(m, "maxEntriesPerTenant", "cache", default=10_000,
                                         minimum=1),
        max_bytes_per_tenant=r.integer(m, "maxBytesPerTenant", "cache",
                                       default=64 * 1024 * 1024, minimum=4096),
        embedder=r.choice(m, "embedder", "cache", CACHE_EMBEDDERS, "ngram"),
        count_towards_quota=r.boolean(m, "countTowardsQuota", "cache", False),
    )


_BILLING_KEYS = ("provider", "usageMetric", "pricingRules", "markup", "minimumPerRequest",
                 "marginRules", "database", "stripe", "cac", "monthlyChurn", "worker")
MAX_RATE_USD = Decimal(1_000_000)


def _read_rules(r: _Reader, value: Any, path: str, tiers: Mapping[str, TierConfig]
                ) -> tuple[PricingRule, ...]:
    rules: list[PricingRule] = []
    for i, raw in enumerate(r.items(value, path)):
        at = f"{path}[{i}]"
        rule = r.mapping(raw, at, ("metric", "rate", "tier"))
        if not rule:
            continue
        r.declare(f"{at}.metric", "choice", options=PRICING_METRICS)
        metric = r.choice(rule, "metric", at, PRICING_METRICS, None)
        if metric is None and "metric" not in rule:
            r.problem(f"{at}.metric", "one of " + ", ".join(PRICING_METRICS), "nothing")
        rate = r.decimal(rule, "rate", at, maximum=MAX_RATE_USD)
        if rate is not None and decimal_places(rate) > MONEY_PLACES:
            r.problem(f"{at}.rate", f"at most {MONEY_PLACES} decimal places", str(rate))
        tier = r.string(rule, "tier", at, default=None)
        if tier is not None and tiers and tier not in tiers:
            r.problem(f"{at}.tier", "one of the tiers " + ", ".join(tiers), repr(tier))
        if metric is not None and rate is not None:
            rules.append(PricingRule(metric, rate, tier))
    return tuple(rules)


def _fraction(r: _Reader, m: Mapping[str, Any], key: str, path: str,
              maximum: Decimal | None = None) -> Decimal | None:
    value: Decimal | None = r.decimal(m, key, path, default=None, maximum=maximum)
    if value is not None and decimal_places(value) > MONEY_PLACES:
        r.problem(f"{path}.{key}", f"at most {MONEY_PLACES} decimal places", str(value))
        return None
    return value


def _read_stripe(r: _Reader, value: Any) -> StripeConfig | None:
    path = "billing.stripe"
    m = r.mapping(value, path, ("apiKeyEnv", "eventName", "meterId", "apiBase",
                                "meterEventsBase", "interval", "streamAbove", "maxRetries"))
    url = re.compile(r"^https?://[^\s/]+(/\S*)?\Z")
    interval = r.duration(m, "interval", path, 10.0)
    r.declare(f"{path}.interval", "duration", minimum=0.1)
    if interval < 0.1:
        r.problem(f"{path}.interval", "a duration of at least 0.1s", _kind(m.get("interval")))
    stripe = StripeConfig(
        api_key_env=r.string(m, "apiKeyEnv", path, default="STRIPE_API_KEY",
                             pattern=re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z"),
                             what="the name of an environment variable"),
        event_name=r.string(m, "eventName", path, default="ai_usage",
                            pattern=re.compile(r"^[A-Za-z0-9_.:-]{1,100}\Z"),
                            what="a meter event name of [A-Za-z0-9_.:-]"),
        meter_id=r.string(m, "meterId", path, default=None),
        api_base=r.string(m, "apiBase", path, default=None, pattern=url, what="an http(s) URL"),
        meter_events_base=r.string(m, "meterEventsBase", path, default=None, pattern=url,
                                   what="an http(s) URL"),
        interval_s=interval,
        stream_above=r.integer(m, "streamAbove", path, default=100, minimum=1),
        max_retries=r.integer(m, "maxRetries", path, default=8, minimum=0),
    )
    return stripe if isinstance(value, Mapping) else None


def _read_worker(r: _Reader, value: Any) -> WorkerConfig:
    path = "billing.worker"
    m = r.mapping(value, path, ("batchSize", "block", "claimIdle", "trimInterval"))
    batch = r.integer(m, "batchSize", path, default=1000, minimum=1)
    if batch > 100_000:
        r.problem(f"{path}.batchSize", "a whole number from 1 to 100000", str(batch))
        batch = 1000
    return WorkerConfig(
        batch_size=batch,
        block_ms=int(r.duration(m, "block", path, 1.0) * 1000),
        claim_idle_s=r.duration(m, "claimIdle", path, 30.0),
        trim_interval_s=r.duration(m, "trimInterval", path, 10.0),
    )


def _read_billing(r: _Reader, value: Any, tiers: Mapping[str, TierConfig],
                  base: Path | None) -> BillingConfig:
    m = r.mapping(value, "billing", _BILLING_KEYS)
    rules = _read_rules(r, m.get("pricingRules"), "billing.pricingRules", tiers)
    margin_rules: list[MarginRule] = []
    for i, raw in enumerate(r.items(m.get("marginRules"), "billing.marginRules")):
        at = f"billing.marginRules[{i}]"
        rule = r.mapping(raw, at, ("below", "markup", "pricingRules"))
        if not rule:
            continue
        below = r.decimal(rule, "below", at, minimum=Decimal(-1000), maximum=Decimal(1))
        markup = _fraction(r, rule, "markup", at, maximum=Decimal(1000))
        switch = _read_rules(r, rule.get("pricingRules"), f"{at}.pricingRules", tiers)
        if below is not None:
            margin_rules.append(MarginRule(below, markup, switch))
    database = r.string(m, "database", "billing", default=DEFAULT_LEDGER,
                        pattern=re.compile(r"^[a-z0-9+]+://\S*\Z"),
                        what="an SQLAlchemy URL, e.g. sqlite:///ledger.sqlite3 or "
                             "postgresql+psycopg://user@host/db")
    database = _ledger_url(database, base)
    r.declare("billing.usageMetric", "choice", options=USAGE_METRICS)
    return BillingConfig(
        provider=r.string(m, "provider", "billing", default=None),
        usage_metric=r.choice(m, "usageMetric", "billing", USAGE_METRICS, "tokens"),
        pricing_rules=rules,
        markup=_fraction(r, m, "markup", "billing", maximum=Decimal(1000)),
        minimum_per_request=_fraction(r, m, "minimumPerRequest", "billing",
                                      maximum=MAX_RATE_USD),
        margin_rules=tuple(margin_rules),
        database=database,
        stripe=_read_stripe(r, m.get("stripe")),
        cac=_fraction(r, m, "cac", "billing", maximum=MAX_BUDGET_USD),
        monthly_churn=_fraction(r, m, "monthlyChurn", "billing", maximum=Decimal(1)),
        worker=_read_worker(r, m.get("worker")),
    )


def _ledger_url(url: str, base: Path | None) -> str:
    """A relative SQLite path is taken from the configuration file's folder (else the
    working directory), so the app, the worker and ``ai-saas report`` find one ledger."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url == prefix or url.startswith(prefix + "/"):
        return url
    rest = url[len(prefix):]
    if rest.startswith(":memory:") or base is None:
        return url
    return prefix + str((base / rest).resolve())


def _read_http(r: _Reader, value: Any) -> HttpConfig:
    m = r.mapping(value, "http", ("maxBodyBytes", "tenantHeader"))
    header = r.string(m, "tenantHeader", "http", default=None,
                      pattern=re.compile(r"^[A-Za-z0-9-]{1,64}\Z"), what="an HTTP header name")
    return HttpConfig(
        max_body_bytes=r.integer(m, "maxBodyBytes", "http", default=1_048_576, minimum=1),
        tenant_header=header.lower() if header else None,
    )


def _read_quota(r: _Reader, value: Any) -> QuotaConfig:
    m = r.mapping(value, "quota", ("promptEstimate", "reservationTimeout"))
    timeout = r.duration(m, "reservationTimeout", "quota", 60.0)
    r.declare("quota.reservationTimeout", "duration", minimum=1)
    if timeout < 1:
        # Shorter than a provider call: reservations would lapse under requests still
        # running, and their tokens would be admitted twice.
        r.problem("quota.reservationTimeout", "a duration of at least 1s",
                  _kind(m.get("reservationTimeout")))
        timeout = 60.0
    return QuotaConfig(
        prompt_estimate=r.choice(m, "promptEstimate", "quota", PROMPT_ESTIMATE_MODES,
                                 "estimate"),
        reservation_timeout_s=timeout,
    )


def _read_providers(r: _Reader, value: Any) -> dict[str, ProviderConfig]:
    providers: dict[str, ProviderConfig] = {}
    env_hint = "the name of an environment variable ([A-Za-z_][A-Za-z0-9_]*), not a key"
    r.declare("providers[].apiKeyEnv", "string", pattern=_ENV_NAME_RE, what=env_hint)
    for i, raw in enumerate(r.items(value, "providers")):
        path = f"providers[{i}]"
        m = r.mapping(raw, path, ("id", "kind", "baseUrl", "apiKeyEnv", "connectTimeout",
                                  "readTimeout", "maxConnections"))
        if not m:
            continue
        provider_id = r.string(m, "id", path, pattern=TENANT_ID_RE,
                               what="a provider id of [A-Za-z0-9_.-], 1 to 64 characters")
        kind = r.choice(m, "kind", path, PROVIDER_KINDS, _MISSING)
        if kind is _MISSING:
            if m.get("kind") is None:  # a wrong kind was reported by choice
                r.problem(f"{path}.kind", "one of " + ", ".join(PROVIDER_KINDS), "nothing")
            kind = None
        base_url = r.string(m, "baseUrl", path, default=None, pattern=_BASE_URL_RE,
                            what="an http:// or https:// URL")
        env = m.get("apiKeyEnv")
        if env is not None and not (isinstance(env, str) and _ENV_NAME_RE.match(env)):
            # Never echo the value: someone may have pasted the key itself here.
            r.problem(f"{path}.apiKeyEnv", env_hint,
                      "a value that is not an environment variable name"
                      if isinstance(env, str) else _kind(env))
            env = None
        connect = r.duration(m, "connectTimeout", path, 5.0)
        read = r.duration(m, "readTimeout", path, 60.0)
        for key, seconds in (("connectTimeout", connect), ("readTimeout", read)):
            r.declare(f"{path}.{key}", "duration", minimum=0.001)
            if seconds <= 0:  # zero would fail every call, or mean "no timeout" to a client
                r.problem(f"{path}.{key}", "a duration above 0", _kind(m.get(key)))
        config = ProviderConfig(
            id=provider_id or "",
            kind=kind or "openai",
            base_url=(base_url or _PROVIDER_BASE_URLS[kind or "openai"]).rstrip("/"),
            api_key_env=env,
            connect_timeout_s=connect if connect > 0 else 5.0,
            read_timeout_s=read if read > 0 else 60.0,
            max_connections=r.integer(m, "maxConnections", path, default=100, minimum=1),
        )
        if provider_id and provider_id in providers:
            r.problem(f"{path}.id", "a provider id used once", f"duplicate {provider_id!r}")
        elif provider_id:
            providers[provider_id] = config
    return providers


def _check_providers(r: _Reader, section: Any, providers: Mapping[str, ProviderConfig],
                     models: Mapping[str, ModelProfile], models_raw: Any) -> None:
    # Without a providers section the provider layer is not used and a model's provider
    # is only a label in its usage events (as before providers existed).
    if section is None:
        return
    index: dict[Any, int] = {}  # model id -> its place in the file, for the problem's path
    for i, raw in enumerate(models_raw if isinstance(models_raw, (list, tuple)) else ()):
        if isinstance(raw, Mapping) and isinstance(raw.get("id"), str):
            index.setdefault(raw["id"], i)
    for profile in models.values():
        if profile.provider and profile.provider not in providers:
            r.problem(f"models[{index.get(profile.id, 0)}].provider", "one of the providers' ids "
                      + ", ".join(providers) if providers else "a provider id in providers",
                      repr(profile.provider))


def _check_references(r: _Reader, tiers: Mapping[str, TierConfig],
                      models: Mapping[str, ModelProfile], routing: RoutingConfig) -> None:
    # Models named without a profile are allowed (the seed template has none); but a
    # deployment that does give profiles must give one for every model it names.
    if not models:
        return
    for i, tier in enumerate(tiers.values()):
        for j, model_id in enumerate(tier.allowed_models):
            if model_id not in models:
                r.problem(f"tenant.tiers[{i}].allowedModels[{j}]",
                          "a model with a profile in models", repr(model_id))
    for i, model_id in enumerate(routing.fallback_chain):
        if model_id not in models:
            r.problem(f"routing.fallbackChain[{i}]", "a model with a profile in models",
                      repr(model_id))


def any_budget(tiers: Mapping[str, TierConfig], tenants: Mapping[str, TenantConfig]) -> bool:
    """Does any tier or tenant set a money budget?"""
    limits: list[tuple[Decimal | None, Decimal | None]] = [
        (t.monthly_budget, t.daily_budget) for t in tiers.values()]
    limits += [(t.monthly_budget, t.daily_budget) for t in tenants.values()]
    return any(monthly is not None or daily is not None for monthly, daily in limits)


def check_budget_prices(r: _Reader, path: str, model: ModelProfile) -> None:
    """A budget is counted in picodollars: every cost must be a whole number of them, so
    every price at most 12 decimal places (a tenth of a micro-dollar per million tokens).
    The configuration's loader and the run-time price book both check it so."""
    for key, price in (("costPerInputToken", model.cost_per_input_token),
                       ("costPerOutputToken", model.cost_per_output_token)):
        if decimal_places(price) > MONEY_PLACES:
            r.problem(f"{path}.{key}", f"a price with at most {MONEY_PLACES} decimal "
                      "places (money budgets count picodollars)", f"{price:f}")


def _check_budget_prices(r: _Reader, tiers: Mapping[str, TierConfig],
                         tenants: Mapping[str, TenantConfig],
                         models: Mapping[str, ModelProfile]) -> None:
    if any_budget(tiers, tenants):
        for i, model in enumerate(models.values()):
            check_budget_prices(r, f"models[{i}]", model)


def _build(data: Any, source: str, base: Path | None, reader: _Reader | None = None
           ) -> Config:
    # ``reader``: the JSON Schema's recorder (ai_saas_middleware.schema) passes its own.
    r = reader if reader is not None else _Reader()
    top = r.mapping(data, "", _TOP)
    tiers = _read_tiers(r, top.get("tenant"))
    catalog = _read_catalog(r, top.get("modelCatalog"), base)
    models = _read_models(r, top.get("models"), catalog)
    tenants = _read_tenants(r, top.get("tenants"), tiers)
    routing = _read_routing(r, top.get("routing"))
    _check_references(r, tiers, models, routing)
    _check_budget_prices(r, tiers, tenants, models)
    providers = _read_providers(r, top.get("providers"))
    _check_providers(r, top.get("providers"), providers, models, top.get("models"))
    config = Config(
        tiers=MappingProxyType(tiers),
        models=MappingProxyType(models),
        tenants=MappingProxyType(tenants),
        endpoints=_read_endpoints(r, top.get("endpoints")),
        redis=_read_redis(r, top.get("redis")),
        routing=routing,
        cache=_read_cache(r, top.get("cache")),
        billing=_read_billing(r, top.get("billing"), tiers, base),
        http=_read_http(r, top.get("http")),
        quota=_read_quota(r, top.get("quota")),
        providers=MappingProxyType(providers),
        source=source,
    )
    if r.problems:
        raise ConfigError(r.problems, source)
    return config


def load_config(source: Config | Mapping[str, Any] | str | os.PathLike[str]) -> Config:
    """Load and validate a configuration.

    Args:
        source: a path to a YAML file, a mapping of the same structure, or a
            :class:`Config` (returned unchanged).

    Returns:
        The frozen :class:`Config`.

    Raises:
        ConfigError: with every problem found, each with its path, expected and found.
    """
    if isinstance(source, Config):
        return source
    if isinstance(source, Mapping):
        return _build(source, "<dict>", None)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            data = _read_yaml(path)
        except OSError as exc:
            raise ConfigError([ConfigProblem(str(path), "a readable YAML file",
                                             exc.strerror or type(exc).__name__)],
                              str(path)) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
            raise ConfigError([ConfigProblem(where, "valid YAML",
                                             str(getattr(exc, "problem", exc)))],
                              str(path)) from None
        if data is None:  # nothing, or only comments: surely not the file meant
            raise ConfigError([ConfigProblem(_TOP_LEVEL, _SECTIONS,
                                             "nothing: the file is empty")], str(path))
        return _build(data, str(path), path.parent)
    raise ConfigError([ConfigProblem("config", "a YAML path, a mapping or a Config",
                                     _kind(source))])


# --------------------------------------------------------------------------- reports


def serving_gaps(config: Config) -> list[str]:
    """What a serving deployment still lacks (empty when nothing does)."""
    gaps: list[str] = []
    if not config.tiers:
        gaps.append("no tiers (tenant.tiers): no tenant can be admitted")
    named = sorted({m for t in config.tiers.values() for m in t.allowed_models})
    missing = [m for m in named if m not in config.models]
    if missing:
        gaps.append("no model profile (models) for " + ", ".join(missing)
                    + ": routing only considers models with profiles")
    for tier in config.tiers.values():
        if not tier.allowed_models:
            gaps.append(f"tier {tier.name!r} allows no model (allowedModels is empty)")
        elif not any(m in config.models for m in tier.allowed_models):
            gaps.append(f"tier {tier.name!r} has no allowed model with a profile")
    if not config.endpoints:
        gaps.append("no endpoints: no request counts as an AI request")
    if not config.tenants:
        gaps.append("no static tenants: add some under tenants, or store them in Redis "
                    "with 'ai-saas tenants add'")
    if config.redis.url is None:
        gaps.append("no redis.url: REDIS_URL or redis://127.0.0.1:6379/0 will be used")
    return gaps


def _limit(value: int | None, unit: str) -> str:
    return "unlimited" if value is None else f"{value:,} {unit}"


def describe(config: Config) -> str:
    """A human summary of a valid configuration (tiers, models, endpoints)."""
    lines = [f"Configuration {config.source or ''} is valid.".replace("  ", " "), "", "Tiers:"]
    for t in config.tiers.values():
        lines.append(f"  {t.name:<12} {_limit(t.rate_limit, 'req/min'):>16}  "
                     f"{_limit(t.monthly_quota, 'tokens/month'):>22}  "
                     f"models: {', '.join(t.allowed_models) or '-'}")
    lines.append("Models:" if config.models else "Models: none with a profile")
    for m in config.models.values():
        lines.append(f"  {m.id:<16} {m.provider:<10} in ${m.cost_per_input_token:f}/tok  "
                     f"out ${m.cost_per_output_token:f}/tok  ctx {m.max_tokens:,}  "
                     f"quality {m.quality_score}  p99 {m.latency_p99_ms} ms")
    lines.append("Endpoints:" if config.endpoints else "Endpoints: none")
    for e in config.endpoints:
        needs = []
        if e.required_quality is not None:
            needs.append(f"quality >= {e.required_quality}")
        if e.max_latency_ms is not None:
            needs.append(f"p99 <= {e.max_latency_ms} ms")
        if e.max_cost_per_request is not None:
            needs.append(f"cost <= ${e.max_cost_per_request:f}")
        methods = ",".join(sorted(e.methods)) if e.methods else "any"
        lines.append(f"  {e.path:<20} methods {methods}; {'; '.join(needs) or 'no requirements'}"
                     f"; default max output {e.default_max_output_tokens} tokens")
    lines.append(f"Tenants in config: {len(config.tenants)}")
    gaps = serving_gaps(config)
    if gaps:
        lines += ["", "A serving deployment still lacks:"] + [f"  - {g}" for g in gaps]
    return "\n".join(lines)

