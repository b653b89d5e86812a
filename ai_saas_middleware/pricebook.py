"""The price book: the model profiles in force, i.e. the configuration's ``models``
overridden, field by field, by run-time changes stored in Redis (``ai-saas models set``).

Providers change prices; routing and billing follow without a redeploy. An override may
change ``costPerInputToken``, ``costPerOutputToken`` (exact decimals, USD per token),
``qualityScore``, ``latencyP99Ms``, ``maxTokens`` and ``enabled`` (a disabled model is
absent from :attr:`PriceBook.models`, so routing never picks it). Each override is
validated exactly as the configuration's ``models`` entries are (the same reader, on the
profile the override makes), so a book can never hold a price the config would refuse.

A model the configuration has no profile for may be added at run time, but only with
every field a profile needs (``provider`` as well, naming one of ``providers:`` when that
section is present): the book never guesses a price. Routing reaches such a model only
where a tier allows it (``tenant.tiers[].allowedModels``); the configuration's own
models keep their ``provider``, which an override cannot change.

Redis (``<prefix>:{models}:*``, one cluster slot; see
:mod:`~ai_saas_middleware.store.keys`)::

    book      hash: model id -> JSON of its overridden fields (money as decimal strings)
    version   integer, INCR'd by every change, in the same atomic step (pricebook.lua)
    history   hash: version -> {"ts": ms, "model": id, "book": {the whole book}}

**Versions.** :attr:`PriceBook.version` is the ``price_version`` a usage event records:
0 is the configuration's profiles (no override ever made); N is the configuration's
profiles overridden by ``history[N]["book"]``. So a reader reproduces the prices of any
past event from its ``price_version`` with :meth:`PriceBookAdmin.at_version` (or by
hand: ``HGET <prefix>:{models}:history N``, overlaid on the configuration's ``models``).
Fields an override leaves alone come from the configuration, so reproducing a version
needs the configuration's ``models`` of its time (a deployment keeps its config under
version control; pin a price with ``models set`` to make it independent of the file).
The history keeps every version (a change is a manual act: a few hundred bytes each).

**Processes.** Every write announces its new version (``PUBLISH
<prefix>:{models}:changed``). Each process's gateway has one watch thread
(:mod:`~ai_saas_middleware.watch`) that listens, and then refreshes its
:class:`PriceBook`: it reads the version (one GET) and the whole book only when the
version changed (one EVAL that reads both together), so every process follows a change
within milliseconds, and an idle one sends nothing. The request side reads
:attr:`PriceBook.current` (a :class:`PriceSnapshot`, replaced whole, never mutated): no
lock, no I/O. Until the first refresh answers, the book is the configuration's (version
0), which is also what a process keeps, as last read, while Redis is unreachable.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from .config import (
    Config,
    ModelProfile,
    _read_models,
    _Reader,
    any_budget,
    check_budget_prices,
)
from .errors import AISaaSError, ConfigError, ConfigProblem, StoreError
from .pricing import MONEY
from .store.keys import KeySchema
from .store.redis import load_script

__all__ = [
    "NEW_MODEL_FIELDS",
    "OVERRIDABLE_FIELDS",
    "PriceBook",
    "PriceBookAdmin",
    "PriceSnapshot",
    "UnknownModel",
    "UnknownVersion",
    "effective_profile",
]

log = logging.getLogger("ai_saas_middleware")

Store = Any  # a sync RedisStore

OVERRIDABLE_FIELDS = ("costPerInputToken", "costPerOutputToken", "qualityScore",
                      "latencyP99Ms", "maxTokens", "enabled")
"""The fields an override may change on a model of the configuration."""
NEW_MODEL_FIELDS = ("provider", "costPerInputToken", "costPerOutputToken", "maxTokens",
                    "qualityScore", "latencyP99Ms")
"""The fields a model the configuration does not have must be given, every one."""
_DECIMAL_FIELDS = ("costPerInputToken", "costPerOutputToken", "qualityScore")
_WRITE_ATTEMPTS = 20  # optimistic writes retried while other writers change the book
_MAX_MODEL_ID = 200


class UnknownModel(AISaaSError):
    """No model of that id, neither in the configuration nor in the price book."""


class UnknownVersion(AISaaSError):
    """No price book of that version (never made, or its history was deleted)."""


@dataclass(frozen=True, slots=True)
class PriceSnapshot:
    """One version of the price book, whole.

    Attributes:
        version: the ``price_version`` (0: the configuration's profiles).
        models: the enabled models' effective profiles, by id (the configuration's order,
            then models added at run time by id).
        overrides: model id -> the fields the book overrides (validated; camelCase keys,
            money as Decimal).
        disabled: the ids of the models the book disables (absent from ``models``).
    """

    version: int
    models: Mapping[str, ModelProfile]
    overrides: Mapping[str, Mapping[str, Any]]
    disabled: frozenset[str]

    def overridden(self, model_id: str) -> tuple[str, ...]:
        """The fields of ``model_id`` the book overrides (camelCase), in a fixed order."""
        fields = self.overrides.get(model_id, {})
        return tuple(f for f in ("provider", *OVERRIDABLE_FIELDS) if f in fields)


def _config_snapshot(config: Config) -> PriceSnapshot:
    return PriceSnapshot(0, config.models, MappingProxyType({}), frozenset())


def _profile_fields(profile: ModelProfile) -> dict[str, Any]:
    return {"id": profile.id, "provider": profile.provider,
            "costPerInputToken": profile.cost_per_input_token,
            "costPerOutputToken": profile.cost_per_output_token,
            "maxTokens": profile.max_tokens, "qualityScore": profile.quality_score,
            "latencyP99Ms": profile.latency_p99_ms}


def effective_profile(config: Config, model_id: str, fields: Mapping[str, Any]
                      ) -> ModelProfile | None:
    """The profile ``fields`` (an override, camelCase keys) make of ``model_id``: the
    configuration's profile with those fields replaced, or, for a model the configuration
    lacks, the profile of ``fields`` alone (which must then hold every one of
    :data:`NEW_MODEL_FIELDS`). None when the override disables the model.

    Raises:
        ConfigError: every problem, each with its path (``models[<id>].<field>``), what
            was expected and what was found, as the configuration's loader reports them.
    """
    path = f"models[{model_id}]"
    r = _Reader()
    base = config.models.get(model_id)
    if base is None and (not model_id or len(model_id) > _MAX_MODEL_ID
                         or not model_id.isprintable() or any(c.isspace() for c in model_id)):
        r.problem(f"{path}.id", f"a model id of 1 to {_MAX_MODEL_ID} printable characters "
                                "without spaces", repr(model_id))
        raise ConfigError(r.problems, "the price book")
    known = OVERRIDABLE_FIELDS if base is not None else ("enabled", *NEW_MODEL_FIELDS)
    r.mapping(fields, path, known)
    merged = _profile_fields(base) if base is not None else {"id": model_id}
    merged.update({k: v for k, v in fields.items() if k in known and k != "enabled"})
    if base is None:
        missing = [f for f in NEW_MODEL_FIELDS if fields.get(f) is None]
        if missing:
            r.problem(path, f"a model with a profile in {config.source or 'the configuration'}"
                            ", or a new model with every field (" + ", ".join(NEW_MODEL_FIELDS)
                      + ")", "no " + ", ".join(missing))
    enabled = r.boolean(fields, "enabled", path, True)
    inner = _Reader()
    made = _read_models(inner, [merged], {})
    # The loader names the entry by its index in a list of one: name it by its id.
    r.problems.extend(ConfigProblem(p.path.replace("models[0]", path, 1), p.expected, p.found)
                      for p in inner.problems if base is not None or not p.found == "nothing")
    profile = made.get(model_id)
    if base is None and profile is not None and config.providers \
            and profile.provider not in config.providers:
        r.problem(f"{path}.provider", "one of the providers' ids ("
                  + ", ".join(config.providers) + ")", repr(profile.provider))
    if profile is not None and any_budget(config.tiers, config.tenants):
        check_budget_prices(r, path, profile)
    if r.problems:
        raise ConfigError(r.problems, "the price book")
    return profile if enabled else None


def _encode(fields: Mapping[str, Any]) -> str:
    """An override as the book stores it: JSON, money and quality as decimal strings."""
    out: dict[str, Any] = {}
    for key in sorted(fields):
        value = fields[key]
        if key in _DECIMAL_FIELDS:  # validated already: a Decimal, int, float or str
            value = _plain(value if isinstance(value, Decimal)
                           else Decimal(repr(value) if isinstance(value, float) else value))
        out[key] = value
    return json.dumps(out, separators=(",", ":"), sort_keys=True)


def _plain(amount: Decimal) -> str:
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def _decode(text: str) -> dict[str, Any]:
    value = json.loads(text, parse_float=Decimal)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return {k: (Decimal(v) if k in _DECIMAL_FIELDS and isinstance(v, str) else v)
            for k, v in value.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def build_snapshot(config: Config, version: int, book: Mapping[str, str]
                   ) -> tuple[PriceSnapshot, list[str]]:
    """The snapshot of ``version`` from its book (model id -> stored JSON), and the
    problems of entries that could not be used (each such model keeps its configuration
    profile, or is absent when the configuration has none)."""
    models = dict(config.models)
    overrides: dict[str, Mapping[str, Any]] = {}
    disabled: set[str] = set()
    problems: list[str] = []
    for model_id in sorted(book):
        try:
            fields = _decode(book[model_id])
            profile = effective_profile(config, model_id, fields)
        except ValueError as exc:
            problems.append(f"model {model_id!r}: not a JSON object of fields ({exc})")
            continue
        except ConfigError as exc:
            problems.extend(str(p) for p in exc.problems)
            continue
        overrides[model_id] = MappingProxyType(fields)
        if profile is None:
            models.pop(model_id, None)
            disabled.add(model_id)
        else:
            models[model_id] = profile
    return (PriceSnapshot(version, MappingProxyType(models), MappingProxyType(overrides),
                          frozenset(disabled)), problems)


def _read(store: Store, keys: KeySchema) -> tuple[int, dict[str, str]]:
    """The version and its book, read together."""
    version, flat = store.call("EVAL", load_script("pricebook"), 3, keys.models_book,
                               keys.models_version, keys.models_history, "read")
    return int(version), {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


class PriceBook:
    """This process's view of the price book, kept current by the gateway's
    :class:`~ai_saas_middleware.watch.Watch`, which calls :meth:`refresh` at its start and
    whenever a new version is announced (``<prefix>:{models}:changed``).

    Args:
        config: the deployment's configuration (its ``models`` are version 0).
        keys: the deployment's key schema (prefix).

    The request side reads :attr:`current` once per request (version and models that
    belong together); :attr:`models` and :attr:`version` are shorthands for one of them.
    """

    def __init__(self, config: Config, keys: KeySchema):
        self.config = config
        self._keys = keys
        self.channel = keys.models_channel  # where a new version is announced
        # The price book in force: version and profiles, one consistent whole (replaced
        # whole, never mutated; a plain attribute: read on every AI request).
        self.current = _config_snapshot(config)
        self._warned_version = -1
        self.rounds = 0  # completed refreshes (tests wait on it)

    # ------------------------------------------------------------ the request side

    @property
    def models(self) -> Mapping[str, ModelProfile]:
        """The enabled models' effective profiles (a mapping replaced whole on change)."""
        return self.current.models

    @property
    def version(self) -> int:
        """The version of :attr:`models` (0: the configuration's profiles)."""
        return self.current.version

    # ------------------------------------------------------------ the watch's side

    def refresh(self, store: Store) -> bool:
        """Read the version (one GET) and, when it changed, the book (one EVAL). True when
        the version changed.

        Raises:
            StoreError: Redis did not answer (the book stays as it was).
        """
        raw = store.call("GET", self._keys.models_version)
        version = int(raw) if raw is not None else 0
        if version == self.current.version:
            self.rounds += 1
            return False
        version, book = _read(store, self._keys)
        snapshot, problems = build_snapshot(self.config, version, book)
        if problems and self._warned_version != version:
            self._warned_version = version
            log.error("price book version %d: %d override(s) not used (the configuration's "
                      "profile stays in force for those models): %s", version,
                      len(problems), "; ".join(problems))
        changed = snapshot != self.current
        self.current = snapshot
        self.rounds += 1
        if changed:
            log.info("price book version %d in force (%d models)", version,
                     len(snapshot.models))
        return True


class PriceBookAdmin:
    """Reads and changes the price book (``ai-saas models``): never on a request path.

    Args:
        config: the deployment's configuration.
        store: a sync store.
        keys: the key schema (default: the configuration's prefix and shards).
    """

    def __init__(self, config: Config, store: Store, keys: KeySchema | None = None):
        self.config = config
        self.store = store
        self.keys = keys or KeySchema(config.redis.key_prefix, config.redis.shards)

    def read(self) -> tuple[PriceSnapshot, list[str]]:
        """The book in force and the problems of stored overrides that cannot be used."""
        version, book = _read(self.store, self.keys)
        return build_snapshot(self.config, version, book)

    def set(self, model_id: str, fields: Mapping[str, Any]) -> PriceSnapshot:
        """Override ``fields`` (camelCase keys of :data:`OVERRIDABLE_FIELDS`, plus
        ``provider`` for a model the configuration lacks) of ``model_id``, merged with its
        current overrides; ``enabled: True`` drops a disabled state. A new version.

        Returns:
            The new version's snapshot.

        Raises:
            ConfigError: the override would make a profile the configuration refuses
                (every problem listed), or sets nothing.
        """
        if not fields:
            raise ConfigError([ConfigProblem(f"models[{model_id}]", "at least one field to "
                                             "set", "none")], "the price book")
        for _attempt in range(_WRITE_ATTEMPTS):
            version, book = _read(self.store, self.keys)
            current = _decode(book[model_id]) if model_id in book else {}
            merged = {**current, **fields}
            if merged.get("enabled") is True:
                del merged["enabled"]  # enabled is every profile's default
            effective_profile(self.config, model_id, merged)  # raises ConfigError
            if self._write(version, model_id, _encode(merged) if merged else ""):
                return self._snapshot_after()
        raise StoreError(f"the price book changed {_WRITE_ATTEMPTS} times while model "
                         f"{model_id!r} was being set: try again")

    def reset(self, model_id: str) -> PriceSnapshot | None:
        """Drop every override of ``model_id`` (a new version); None when it had none.

        Raises:
            UnknownModel: neither the configuration nor the book knows ``model_id``.
        """
        for _attempt in range(_WRITE_ATTEMPTS):
            version, book = _read(self.store, self.keys)
            if model_id not in book:
                if model_id in self.config.models:
                    return None
                raise UnknownModel(f"no model {model_id!r}: it has no profile in "
                                   f"{self.config.source or 'the configuration'} and no "
                                   "override in the price book")
            if self._write(version, model_id, ""):
                return self._snapshot_after()
        raise StoreError(f"the price book changed {_WRITE_ATTEMPTS} times while model "
                         f"{model_id!r} was being reset: try again")

    def at_version(self, version: int) -> PriceSnapshot:
        """The price book of a past (or the current) ``version``, rebuilt from the history
        over this configuration's ``models``: the prices a usage event with that
        ``price_version`` was costed with.

        Raises:
            UnknownVersion: no such version in the history.
        """
        if version == 0:
            return _config_snapshot(self.config)
        raw = self.store.call("HGET", self.keys.models_history, str(version))
        if raw is None:
            raise UnknownVersion(f"no price book version {version} in "
                                 f"{self.keys.models_history}")
        entry = json.loads(_text(raw))
        book = {model: json.dumps(fields) for model, fields in entry.get("book", {}).items()}
        snapshot, _problems = build_snapshot(self.config, version, book)
        return snapshot

    def _write(self, expected: int, model_id: str, encoded: str) -> bool:
        written, _version = self.store.call(
            "EVAL", load_script("pricebook"), 3, self.keys.models_book, self.keys.models_version,
            self.keys.models_history, "write", expected, model_id, encoded,
            self.keys.models_channel)
        return bool(int(written))

    def _snapshot_after(self) -> PriceSnapshot:
        snapshot, _problems = self.read()
        return snapshot


def per_million(amount: Decimal) -> Decimal:
    """A price per million tokens as a price per token, exactly."""
    return MONEY.scaleb(amount, -6)
