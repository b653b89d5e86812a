"""The starter configuration that ``ai-saas init`` writes.

:func:`render_starter` makes its text: the seed template's sections (``tenant.tiers``,
``routing``, ``cache``, ``billing``) as the design document gives them, plus what
serving needs (a model profile for each of the five models the tiers name, one tenant
per tier, one AI endpoint, Redis settings). Each tenant gets a fresh API key; only the
key's SHA-256 digest goes in the text, and the keys come back in
:attr:`Starter.keys` for the caller to show once. :func:`write_starter` writes the text
to a file, never over an existing one unless asked to.

The text is kept here as YAML with its comments, not built from a dict: the file is
meant to be read and edited by a person, and the comments say what each part is for.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from .credentials import hash_api_key, new_stored_key
from .errors import AISaaSError

__all__ = [
    "DEFAULT_FILENAME",
    "SEED_SECTIONS",
    "Starter",
    "StarterExists",
    "StarterKey",
    "render_starter",
    "starter_path",
    "starter_tenants",
    "write_starter",
]

DEFAULT_FILENAME = "ai-saas-config.yaml"

# The seed template of the design document (../shared/seed-config.yaml), its four
# sections line for line: the package must serve it unchanged, so the starter is it.
SEED_SECTIONS = """\
tenant:
  tiers:
    - name: free
      monthlyQuota: 10000 # tokens
      rateLimit: 10 # req/min
      allowedModels: [ "model-small", "model-fast" ]
    - name: pro
      monthlyQuota: 100000
      rateLimit: 100
      allowedModels: [ "model-small", "model-medium", "model-large" ]
    - name: enterprise
      monthlyQuota: unlimited
      rateLimit: 1000
      allowedModels: [ "model-small", "model-medium", "model-large", "model-custom" ]
routing:
  strategy: cost_optimized
  fallbackChain:
    - "model-large"
    - "model-medium"
    - "model-small"
  circuitBreaker:
    errorThreshold: 5
    resetTimeout: 30s
cache:
  enabled: true
  ttl: 3600 # seconds
  similarityThreshold: 0.85
billing:
  provider: "stripe"
  usageMetric: "tokens"
  pricingRules:
    - metric: "input_tokens"
      rate: 0.000005
    - metric: "output_tokens"
      rate: 0.000015
"""

_HEADER = """\
# ai-saas-config.yaml, written by `ai-saas init`.
# Reference of every section and key: docs/configuration.md of ai-saas-middleware.
# Check it after each edit: ai-saas check-config {filename}
#
# The seed template's sections (tenant.tiers, routing, cache, billing) come first,
# unchanged; after them what serving needs: models, tenants, endpoints, redis.

"""

# Prices are per token (the providers publish them per million tokens) and quoted, so
# that no YAML tool on the way turns them into binary floats.
_MODELS = """\

# Model profiles of the five models the tiers name. Each id stands for a real model,
# at its provider's list price in USD per token (the providers publish USD per million
# tokens: openai.com/api/pricing, anthropic.com/pricing, together.ai/pricing; figures of
# mid-2025, check them before you bill) and its context window (maxTokens).
# qualityScore (0-1) and latencyP99Ms are starting estimates for routing: replace them
# with what you measure. To take prices from LiteLLM's cost map instead, see
# modelCatalog in the reference.
models:
  - id: model-fast             # OpenAI gpt-4.1-nano: $0.10 in, $0.40 out per 1M tokens
    provider: openai
    costPerInputToken: "0.0000001"
    costPerOutputToken: "0.0000004"
    maxTokens: 1047576
    qualityScore: 0.55
    latencyP99Ms: 1500
  - id: model-small            # OpenAI gpt-4o-mini: $0.15 in, $0.60 out per 1M tokens
    provider: openai
    costPerInputToken: "0.00000015"
    costPerOutputToken: "0.0000006"
    maxTokens: 128000
    qualityScore: 0.62
    latencyP99Ms: 2000
  - id: model-medium           # Anthropic claude-3-5-haiku: $0.80 in, $4 out per 1M tokens
    provider: anthropic
    costPerInputToken: "0.0000008"
    costPerOutputToken: "0.000004"
    maxTokens: 200000
    qualityScore: 0.75
    latencyP99Ms: 3000
  - id: model-large            # Anthropic claude-sonnet-4: $3 in, $15 out per 1M tokens
    provider: anthropic
    costPerInputToken: "0.000003"
    costPerOutputToken: "0.000015"
    maxTokens: 200000
    qualityScore: 0.92
    latencyP99Ms: 8000
  - id: model-custom           # Llama 3.3 70B Instruct Turbo on Together AI: $0.88 per 1M tokens
    provider: together
    costPerInputToken: "0.00000088"
    costPerOutputToken: "0.00000088"
    maxTokens: 131072
    qualityScore: 0.80
    latencyP99Ms: 4000
"""

_TENANTS_HEAD = """\

# One tenant per tier, each with the SHA-256 digest of a key `ai-saas init` showed once
# (the key itself is in no file). Rename them or add your own: the digest of a key is
#   printf 'sha256:%s\\n' "$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)"
# Or keep tenants in Redis instead: ai-saas tenants add ID --tier TIER
tenants:
"""

_ENDPOINTS_AND_REDIS = """\

# Requests whose path matches an endpoint (a glob; the first match wins) are AI
# requests: admitted, routed and billed. Every other path passes through untouched.
endpoints:
  - path: /ai/*
    methods: [ POST ]
    defaultMaxOutputTokens: 512  # reserved against the quota when a request names no max_tokens

# No url here: $REDIS_URL, else redis://127.0.0.1:6379/0 (what `ai-saas redis` serves
# for local development). Set url: to pin one (rediss://, unix://, redis+cluster://).
redis:
  keyPrefix: aisaas
  onUnavailable: open          # Redis unreachable: serve within a local allowance (closed: 503)
"""


@dataclass(frozen=True, slots=True)
class StarterKey:
    """A new tenant of the starter file and its API key (to be shown once, never stored)."""

    tenant_id: str
    tier: str
    api_key: str


@dataclass(frozen=True, slots=True)
class Starter:
    """A rendered starter configuration: its YAML text and the keys its digests are of."""

    text: str
    keys: tuple[StarterKey, ...]


class StarterExists(AISaaSError):
    """The file ``ai-saas init`` would write exists already (and ``--force`` was not given)."""


def starter_tenants() -> tuple[tuple[str, str], ...]:
    """(tenant id, tier) of the starter's tenants: ``example-<tier>`` for each seed tier."""
    seed = yaml.safe_load(SEED_SECTIONS)
    return tuple((f"example-{tier['name']}", tier["name"]) for tier in seed["tenant"]["tiers"])


def render_starter(filename: str = DEFAULT_FILENAME,
                   api_keys: Mapping[str, str] | None = None) -> Starter:
    """The starter configuration's text and its tenants' keys.

    Args:
        filename: the file's name, for the ``check-config`` hint in its header.
        api_keys: tenant id -> key to use instead of fresh ones (for tests and for
            callers that make keys their own way); tenants it omits get fresh keys.

    Returns:
        A :class:`Starter`: ``text`` holds only the keys' ``sha256:`` digests.
    """
    keys = tuple(StarterKey(tenant_id, tier, (api_keys or {}).get(tenant_id)
                            or new_stored_key(tenant_id))
                 for tenant_id, tier in starter_tenants())
    tenants = "".join(f"  - id: {k.tenant_id}\n"
                      f"    tier: {k.tier}\n"
                      f"    apiKeys: [ \"sha256:{hash_api_key(k.api_key)}\" ]\n"
                      for k in keys)
    text = (_HEADER.format(filename=filename) + SEED_SECTIONS + _MODELS + _TENANTS_HEAD
            + tenants + _ENDPOINTS_AND_REDIS)
    return Starter(text=text, keys=keys)


def starter_path(path: str | os.PathLike[str]) -> Path:
    """Where ``ai-saas init PATH`` writes: PATH, or ``ai-saas-config.yaml`` in it when it
    is a directory."""
    target = Path(path)
    return target / DEFAULT_FILENAME if target.is_dir() else target


def write_starter(path: str | os.PathLike[str], *, force: bool = False) -> tuple[Path, Starter]:
    """Write a fresh starter configuration to ``path`` (a file, or a directory to put
    ``ai-saas-config.yaml`` in).

    Returns:
        The path written and the :class:`Starter` (whose keys are nowhere else).

    Raises:
        StarterExists: the file exists and ``force`` is false (nothing is written).
        AISaaSError: the file cannot be written (no such directory, no permission).
    """
    target = starter_path(path)
    starter = render_starter(target.name)
    try:
        if force and target.is_file():
            _replace(target, starter.text)
        else:
            # "x" creates the file or fails if anything (a symlink too) is there: no
            # window between a check and the write in which another file could appear.
            with target.open("x", encoding="utf-8") as fh:
                fh.write(starter.text)
    except FileExistsError:
        raise StarterExists(f"{target} exists: not overwritten (use --force to replace "
                            "it; the keys of its tenants would stop working)") from None
    except OSError as exc:
        raise AISaaSError(f"cannot write {target}: {exc.strerror or type(exc).__name__}"
                          ) from None
    return target, starter


def _replace(target: Path, text: str) -> None:
    """Replace a file by one holding ``text``, with the old one's permissions: the new
    file or the old one is there after a crash, never half of each."""
    mode = target.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
