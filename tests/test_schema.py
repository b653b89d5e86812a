"""``ai-saas schema``: the configuration's JSON Schema agrees with the loader.

What editors get from it must be what ``check-config`` says: every configuration the
loader accepts validates (the starter, the seed template, the suite's BASE_CONFIG, the
documents' examples, the loader's lenient spellings), the mistakes it refuses are refused
at the same path, the schema refuses nothing the loader accepts in the documents' refused
examples, and every key the loader accepts is in it, no other.
"""

from __future__ import annotations

import ast
import copy
import inspect
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

from conftest import BASE_CONFIG  # noqa: E402
from test_docs import DOCUMENTS, blocks_of, prepare_in_memory  # noqa: E402

from ai_saas_middleware import config as config_module  # noqa: E402
from ai_saas_middleware import load_config  # noqa: E402
from ai_saas_middleware.errors import ConfigError  # noqa: E402
from ai_saas_middleware.schema import SCHEMA_DIALECT, _Recorder, build_schema  # noqa: E402
from ai_saas_middleware.starter import render_starter  # noqa: E402

AI_SAAS = Path(sys.executable).parent / "ai-saas"
SEED = Path("/work/shared/seed-config.yaml")
DIGEST = "sha256:" + "0" * 64
Mutation = Callable[[dict[str, Any]], None]


@pytest.fixture(scope="module")
def validator() -> Any:
    return jsonschema.Draft202012Validator(build_schema())


def dotted(parts: list[Any]) -> str:
    """A jsonschema error's path in the loader's notation (``tenants[0].apiKeys[1]``)."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def refused_paths(validator: Any, data: Any) -> set[str]:
    """The paths the schema refuses, as the loader names them: an unknown or a missing
    key at the key's own path (JSON Schema reports it at the mapping that holds it)."""
    paths: set[str] = set()
    for error in validator.iter_errors(data):
        base = list(error.absolute_path)
        if error.validator == "additionalProperties":
            known = error.schema.get("properties", {})
            paths |= {dotted([*base, key]) for key in error.instance if key not in known}
        elif error.validator == "required":
            paths |= {dotted([*base, key]) for key in error.validator_value
                      if key not in error.instance}
        else:
            paths.add(dotted(base))
    return paths


def loader_paths(data: Any) -> set[str]:
    with pytest.raises(ConfigError) as refused:
        load_config(data)
    return {problem.path for problem in refused.value.problems}


def starter() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(render_starter().text)
    return data


# --------------------------------------------------------------------------- the schema


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = build_schema()

    assert schema["$schema"] == SCHEMA_DIALECT == "https://json-schema.org/draft/2020-12/schema"
    # check_schema checks the patterns' regex syntax too (the "regex" format).
    jsonschema.Draft202012Validator.check_schema(schema)
    json.dumps(schema)  # JSON as it is: no Decimal, no tuple


@pytest.mark.parametrize("name, data", [
    ("the starter of ai-saas init", starter()),
    ("the seed template", yaml.safe_load(SEED.read_text("utf-8"))),
    ("the suite's BASE_CONFIG", copy.deepcopy(BASE_CONFIG)),
])
def test_the_configurations_the_loader_accepts_validate(validator: Any, name: str,
                                                        data: dict[str, Any]) -> None:
    load_config(data)  # the loader accepts it ...
    assert refused_paths(validator, data) == set(), name  # ... and so does the schema


def test_every_example_of_the_documents_validates_or_is_refused_where_the_loader_says(
        validator: Any) -> None:
    checked = 0
    for document in DOCUMENTS:
        for block in blocks_of(document):
            if block.language != "yaml":
                continue
            data = prepare_in_memory(block)
            if block.marker == "invalid":
                # The schema sees less (no tier list, no catalog file) but never refuses
                # what check-config accepts.
                refused = refused_paths(validator, data)
                assert refused and refused <= loader_paths(data), block.where
            else:
                assert refused_paths(validator, data) == set(), block.where
            checked += 1
    assert checked >= 10


def with_value(path: str, value: Any) -> Mutation:
    """A mutation that sets ``path`` (``a.b[0].c``) of a configuration to ``value``."""
    parts: list[Any] = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]

    def mutate(config: dict[str, Any]) -> None:
        node: Any = config
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value

    return mutate


def without(path: str) -> Mutation:
    parent, key = path.rsplit(".", 1)

    def mutate(config: dict[str, Any]) -> None:
        node: Any = config
        for part in re.findall(r"[^.\[\]]+", parent):
            node = node[int(part) if part.isdigit() else part]
        del node[key]

    return mutate


BROKEN: list[tuple[str, str, Mutation]] = [
    ("an unknown key", "redis.keyPrefx", with_value("redis.keyPrefx", "x")),
    ("an unknown section", "tenantz", with_value("tenantz", {})),
    ("an unknown key of a list item", "tenants[0].apikeys",
     with_value("tenants[0].apikeys", [DIGEST])),
    ("a wrong type (a string for a limit)", "tenant.tiers[0].rateLimit",
     with_value("tenant.tiers[0].rateLimit", "ten")),
    ("a wrong type (a string for a boolean)", "cache.enabled",
     with_value("cache", {"enabled": "yes"})),
    ("a wrong type (a mapping for a list)", "endpoints", with_value("endpoints", {"a": 1})),
    ("a fraction for a whole number", "models[0].maxTokens",
     with_value("models[0].maxTokens", 1000.5)),
    ("a bad enum value", "redis.onUnavailable", with_value("redis.onUnavailable", "maybe")),
    ("a bad enum value of a tier", "tenant.tiers[1].onUnavailable",
     with_value("tenant.tiers[1].onUnavailable", "OPEN")),
    ("a bad prompt estimate", "quota.promptEstimate",
     with_value("quota", {"promptEstimate": "guess"})),
    ("a method that is not HTTP's", "endpoints[0].methods[0]",
     with_value("endpoints[0].methods", ["FETCH"])),
    ("a bad duration", "routing.circuitBreaker.resetTimeout",
     with_value("routing", {"circuitBreaker": {"resetTimeout": "30 seconds"}})),
    ("a negative duration", "cache.ttl", with_value("cache", {"ttl": -1})),
    ("a dedupe TTL under a second", "redis.dedupeTtl", with_value("redis.dedupeTtl", 0)),
    ("a negative quota", "tenant.tiers[0].monthlyQuota",
     with_value("tenant.tiers[0].monthlyQuota", -1)),
    ("a rate limit of 0", "tenant.tiers[0].rateLimit",
     with_value("tenant.tiers[0].rateLimit", 0)),
    ("a negative price", "models[0].costPerInputToken",
     with_value("models[0].costPerInputToken", "-0.1")),
    ("a quality over 1", "models[1].qualityScore", with_value("models[1].qualityScore", 1.5)),
    ("a bad tenant id pattern", "tenants[0].id", with_value("tenants[0].id", "acme corp")),
    ("a tenant id too long", "tenants[0].id", with_value("tenants[0].id", "a" * 65)),
    ("a tier name with a newline", "tenant.tiers[0].name",
     with_value("tenant.tiers[0].name", "free\n")),
    ("a key that is not a digest", "tenants[1].apiKeys[0]",
     with_value("tenants[1].apiKeys", ["sha256:" + "A" * 64])),
    ("a missing required key", "tenants[0].tier", without("tenants[0].tier")),
    ("a model without a price (no catalog)", "models[0].costPerOutputToken",
     without("models[0].costPerOutputToken")),
    ("a Redis URL of another scheme", "redis.url", with_value("redis.url", "http://x")),
    ("an endpoint path not starting with /", "endpoints[1].path",
     with_value("endpoints[1].path", "ai/*")),
    ("a header name with a space", "http.tenantHeader",
     with_value("http", {"tenantHeader": "X Tenant"})),
]


@pytest.mark.parametrize("path, mutate", [pytest.param(p, m, id=what) for what, p, m in BROKEN])
def test_what_the_loader_refuses_the_schema_refuses_at_the_same_path(
        validator: Any, path: str, mutate: Mutation) -> None:
    config = copy.deepcopy(BASE_CONFIG)
    mutate(config)

    assert path in loader_paths(config)
    assert refused_paths(validator, config) == {path}


@pytest.mark.parametrize("mutate", [
    pytest.param(with_value("tenant.tiers[0].monthlyQuota", " Unlimited "), id="Unlimited"),
    pytest.param(with_value("endpoints[0].methods", ["post", "Get"]), id="lower-case methods"),
    pytest.param(with_value("routing", {"circuitBreaker": {"resetTimeout": "250ms"}}),
                 id="a duration with a unit"),
    pytest.param(with_value("cache", {"ttl": 0.5, "similarityThreshold": "0.9"}),
                 id="plain seconds and a quoted decimal"),
    pytest.param(with_value("models[0].costPerInputToken", 1.5e-7), id="a price as a number"),
    pytest.param(with_value("redis", None), id="a section with no value"),
    pytest.param(with_value("redis.shards", None), id="a key with no value"),
    pytest.param(with_value("redis.url", "rediss+cluster://h:6380/0"), id="a cluster URL"),
])
def test_what_the_loader_accepts_the_schema_accepts(validator: Any, mutate: Mutation) -> None:
    config = copy.deepcopy(BASE_CONFIG)
    mutate(config)
    load_config(config)

    assert refused_paths(validator, config) == set()


def test_profiles_may_leave_out_what_a_model_catalog_fills(validator: Any,
                                                           tmp_path: Path) -> None:
    (tmp_path / "catalog.json").write_text(json.dumps({"gpt-x": {
        "litellm_provider": "openai", "input_cost_per_token": 1e-7,
        "output_cost_per_token": 4e-7, "max_input_tokens": 1000}}), "utf-8")
    profiles = [{"id": "gpt-x", "qualityScore": 0.5, "latencyP99Ms": 900}]
    with_catalog = {"modelCatalog": str(tmp_path / "catalog.json"), "models": profiles}

    assert load_config(with_catalog).models["gpt-x"].provider == "openai"
    assert refused_paths(validator, with_catalog) == set()
    assert refused_paths(validator, {"models": profiles}) == loader_paths({"models": profiles})


# --------------------------------------------------------------------------- every key


def accepted_keys(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """Section path (``tenant.tiers[]``) -> the keys the loader accepts there, recorded
    from ``_Reader.mapping`` while real configurations load; every call site reached."""
    accepted: dict[str, set[str]] = {}
    reached: set[int] = set()
    original = config_module._Reader.mapping

    def recording(self: Any, value: Any, path: str, known: tuple[str, ...]) -> Any:
        reached.add(sys._getframe(1).f_lineno)
        accepted.setdefault(re.sub(r"\[\d+\]", "[]", path), set()).update(known)
        return original(self, value, path, known)

    monkeypatch.setattr(config_module._Reader, "mapping", recording)
    with_providers = {**copy.deepcopy(BASE_CONFIG), "providers": [
        {"id": "openai", "kind": "openai", "baseUrl": "https://api.openai.com/v1",
         "apiKeyEnv": "OPENAI_API_KEY", "connectTimeout": "5s", "readTimeout": "60s",
         "maxConnections": 100},
        {"id": "anthropic", "kind": "anthropic"}],
        "billing": {"pricingRules": [{"metric": "input_tokens", "rate": "0.000005"}],
                    "markup": "0.3", "marginRules": [{"below": "0.2", "markup": "0.5"}],
                    "stripe": {"eventName": "ai_tokens"}, "worker": {"batchSize": 500}}}
    for data in (starter(), copy.deepcopy(BASE_CONFIG), with_providers):
        load_config(data)
    tree = ast.parse(inspect.getsource(config_module))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "mapping"
             and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "self")]
    assert calls
    for node in calls:
        assert any(node.lineno <= line <= (node.end_lineno or node.lineno) for line in reached), \
            f"config.py:{node.lineno}: no configuration of this test reaches it"
    return accepted


def schema_at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in re.findall(r"[^.\[\]]+|\[\]", path):
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


def test_every_key_the_loader_accepts_is_in_the_schema_and_no_other(
        monkeypatch: pytest.MonkeyPatch) -> None:
    schema = build_schema()
    accepted = accepted_keys(monkeypatch)

    assert len(accepted) >= 14  # every section and list item
    for section, keys in accepted.items():
        node = schema_at(schema, section)
        assert set(node["properties"]) == keys, section
        assert node["additionalProperties"] is False, section


def test_a_key_no_reader_call_describes_fails_the_build() -> None:
    """The guard that keeps the schema whole: a key in a mapping's known keys that no
    reader call reads cannot silently become ``{}`` (anything)."""
    recorder = _Recorder()
    recorder.mapping({}, "", ("described", "forgotten"))
    recorder.string({}, "described", "")

    with pytest.raises(LookupError, match="forgotten"):
        recorder.schema_of("")


# --------------------------------------------------------------------------- the command


def test_ai_saas_schema_prints_the_schema_and_writes_it_with_output(tmp_path: Path) -> None:
    assert AI_SAAS.exists(), f"{AI_SAAS} is missing: install the package (pip install -e .)"

    printed = subprocess.run([str(AI_SAAS), "schema"], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
    assert printed.returncode == 0 and printed.stderr == ""
    assert json.loads(printed.stdout) == build_schema()
    assert printed.stdout.startswith('{\n  "$schema": ')  # 2-space indent

    written = subprocess.run([str(AI_SAAS), "schema", "--output", "ai-saas-config.schema.json"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "ai-saas-config.schema.json").read_text("utf-8") == printed.stdout
    assert "# yaml-language-server: $schema=./ai-saas-config.schema.json" in written.stdout

    failed = subprocess.run([str(AI_SAAS), "schema", "-o", str(tmp_path / "no" / "x.json")],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.count("\n") == 1 and "cannot write" in failed.stderr
