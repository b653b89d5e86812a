"""Configuration: the seed template, exact decimals, durations, and errors that name their path.

Pure: no Redis. ``ai-saas check-config`` is run in-process through ``cli.main``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import BASE_CONFIG, sha
from hypothesis import given
from hypothesis import strategies as st

from ai_saas_middleware import ConfigError, load_config
from ai_saas_middleware.cli import main
from ai_saas_middleware.config import serving_gaps

# The template of the design document, verbatim: it must load unchanged. Kept here so a
# fresh clone tests it too; test_the_vendored_seed_is_the_shared_one keeps it honest.
SEED_TEXT = """\
# The configuration template from the project's design document, with its
# nesting restored. The project must load this file unchanged.
# ai-saas-config.yaml
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
SHARED_SEED = Path(__file__).resolve().parents[2] / "shared" / "seed-config.yaml"


@pytest.fixture
def seed_path(tmp_path: Path) -> Path:
    return write(tmp_path, SEED_TEXT, "seed-config.yaml")


# What a serving deployment adds to the seed template (the seed names model-custom too).
MODEL_ROWS = [  # id, provider, in, out, context window, quality, p99 ms
    ("model-fast", "openai", "0.0000001", "0.0000004", 16000, 0.55, 400),
    ("model-small", "openai", "0.00000015", "0.0000006", 128000, 0.62, 900),
    ("model-medium", "anthropic", "0.000003", "0.000015", 200000, 0.85, 2500),
    ("model-large", "openai", "0.0000025", "0.00001", 128000, 0.92, 4000),
    ("model-custom", "selfhosted", "0.000001", "0.000002", 32000, 0.80, 1500),
]
SERVING_SECTIONS = "\nmodels:\n" + "".join(
    f"  - {{id: {m}, provider: {p}, costPerInputToken: {i}, costPerOutputToken: {o},\n"
    f"     maxTokens: {w}, qualityScore: {q}, latencyP99Ms: {ms}}}\n"
    for m, p, i, o, w, q, ms in MODEL_ROWS) + f"""\
tenants:
  - id: acme
    tier: free
    apiKeys: [ "{sha('k')}" ]
endpoints:
  - path: /ai/*
    maxCostPerRequest: 0.05
redis:
  url: redis://127.0.0.1:6379/0
"""


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE_CONFIG)


def problems_of(source: Any) -> dict[str, Any]:
    """path -> problem, for a configuration that must fail."""
    with pytest.raises(ConfigError) as caught:
        load_config(source)
    return {p.path: p for p in caught.value.problems}


def write(tmp_path: Path, text: str, name: str = "ai-saas-config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the seed template


def test_the_vendored_seed_is_the_shared_one() -> None:
    if not SHARED_SEED.exists():
        pytest.skip("../shared/seed-config.yaml is not beside this clone")
    assert SHARED_SEED.read_text("utf-8") == SEED_TEXT


def test_seed_template_loads_unchanged(seed_path: Path) -> None:
    config = load_config(seed_path)

    assert list(config.tiers) == ["free", "pro", "enterprise"]
    free, pro, enterprise = config.tiers.values()
    assert (free.monthly_quota, free.rate_limit) == (10000, 10)
    assert free.allowed_models == ("model-small", "model-fast")
    assert (pro.monthly_quota, pro.rate_limit) == (100000, 100)
    assert enterprise.monthly_quota is None  # unlimited
    assert enterprise.rate_limit == 1000
    assert config.routing.strategy == "cost_optimized"
    assert config.routing.fallback_chain == ("model-large", "model-medium", "model-small")
    assert config.routing.circuit_breaker.error_threshold == 5
    assert config.routing.circuit_breaker.reset_timeout_s == 30.0
    assert config.cache.enabled is True
    assert config.cache.ttl_s == 3600.0
    assert config.cache.similarity_threshold == pytest.approx(0.85)
    assert config.billing.provider == "stripe"
    assert [(r.metric, r.rate) for r in config.billing.pricing_rules] == [
        ("input_tokens", Decimal("0.000005")), ("output_tokens", Decimal("0.000015"))]
    assert all(type(r.rate) is Decimal for r in config.billing.pricing_rules)


def test_serving_gaps_of_the_seed_template_name_what_serving_needs(seed_path: Path) -> None:
    gaps = "\n".join(serving_gaps(load_config(seed_path)))

    for model in ("model-small", "model-fast", "model-medium", "model-large", "model-custom"):
        assert model in gaps
    assert "no endpoints" in gaps
    assert "tenants" in gaps
    assert "redis.url" in gaps


def test_seed_template_plus_our_sections_has_no_serving_gaps(tmp_path: Path) -> None:
    path = write(tmp_path, SEED_TEXT + SERVING_SECTIONS)

    config = load_config(path)

    assert serving_gaps(config) == []
    assert set(config.models) == {"model-fast", "model-small", "model-medium", "model-large",
                                  "model-custom"}
    assert config.tenants["acme"].api_key_hashes == (sha("k").removeprefix("sha256:"),)
    assert config.endpoints[0].max_cost_per_request == Decimal("0.05")


def test_a_loaded_config_is_returned_as_is_and_is_immutable() -> None:
    config = load_config(base())

    assert load_config(config) is config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.redis = config.redis  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.tiers["gold"] = config.tiers["free"]  # type: ignore[index]


# --------------------------------------------------------------------------- exact decimals


def test_yaml_prices_are_exact_decimals(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SEED_TEXT + SERVING_SECTIONS))
    small = config.models["model-small"]

    assert type(small.cost_per_input_token) is Decimal
    assert small.cost_per_input_token == Decimal("0.00000015")
    assert small.cost_per_output_token == Decimal("0.0000006")
    # A binary float would make a million tokens cost 0.15000000000000002 or so.
    assert small.cost_per_input_token * 1_000_000 == Decimal("0.15")


def test_float_prices_in_a_dict_read_as_the_decimal_that_was_written() -> None:
    config = base()
    config["models"][0]["costPerInputToken"] = 0.00000015
    config["models"][0]["costPerOutputToken"] = 0.1  # Decimal(0.1) is 0.1000000000000000055...
    config["endpoints"][1]["maxCostPerRequest"] = 0.05

    loaded = load_config(config)
    small = loaded.models["model-small"]

    assert small.cost_per_input_token == Decimal("0.00000015")
    assert small.cost_per_output_token == Decimal("0.1")
    assert type(small.cost_per_output_token) is Decimal
    assert loaded.endpoints[1].max_cost_per_request == Decimal("0.05")


MODEL_YAML = """
tenant:
  tiers: [{name: t, monthlyQuota: 1, rateLimit: 1, allowedModels: [m]}]
models:
  - {id: m, provider: p, costPerInputToken: %s, costPerOutputToken: 0.0000006,
     maxTokens: 1000, qualityScore: 0.5, latencyP99Ms: 100}
"""


@given(st.decimals(min_value=Decimal(0), max_value=Decimal(1), places=12,
                   allow_nan=False, allow_infinity=False))
def test_any_decimal_literal_in_yaml_reads_back_exactly(tmp_path_factory: Any,
                                                        price: Decimal) -> None:
    literal = format(price, "f")
    if "." not in literal:
        literal += ".0"  # keep it a YAML float literal: the case a float would spoil
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(MODEL_YAML % literal, "utf-8")

    assert load_config(path).models["m"].cost_per_input_token == Decimal(literal)


# --------------------------------------------------------------------------- durations, unlimited


@pytest.mark.parametrize(("written", "seconds"), [
    ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("500ms", 0.5), ("2.5s", 2.5),
    (45, 45.0), ("45", 45.0), (0, 0.0),
])
def test_durations(written: Any, seconds: float) -> None:
    config = base()
    config["routing"] = {"circuitBreaker": {"window": written}} if seconds else {}
    config["redis"] = {"retryInterval": written}
    config["cache"] = {"ttl": written}

    loaded = load_config(config)

    if seconds:  # a breaker's window (and reset time) of 0 is refused
        assert loaded.routing.circuit_breaker.window_s == seconds
    assert loaded.redis.retry_interval_s == seconds
    assert loaded.cache.ttl_s == seconds


@pytest.mark.parametrize("written", ["soon", "-1s", -5, "5 minutes", True, "1w"])
def test_a_bad_duration_is_reported_with_its_path(written: Any) -> None:
    config = base()
    config["redis"] = {"socketTimeout": written}

    problem = problems_of(config)["redis.socketTimeout"]

    assert "30s" in problem.expected
    assert str(written) in problem.found


def test_unlimited_quota_and_rate_limit() -> None:
    config = base()
    config["tenant"]["tiers"][1]["monthlyQuota"] = "unlimited"
    config["tenant"]["tiers"][1]["rateLimit"] = "Unlimited"

    pro = load_config(config).tiers["pro"]

    assert pro.monthly_quota is None
    assert pro.rate_limit is None


@pytest.mark.parametrize("written", ["lots", -1, 1.5, True])
def test_a_quota_that_is_neither_tokens_nor_unlimited_is_refused(written: Any) -> None:
    config = base()
    config["tenant"]["tiers"][0]["monthlyQuota"] = written

    problem = problems_of(config)["tenant.tiers[0].monthlyQuota"]

    assert "unlimited" in problem.expected


# --------------------------------------------------------------------------- errors


def test_every_error_is_reported_at_once_with_path_expected_and_found() -> None:
    config = base()
    config["tenant"]["tiers"][1]["rateLimit"] = "fast"
    config["models"][2]["costPerOutputToken"] = "cheap"
    config["endpoints"][0]["path"] = "ai/premium"
    config["redis"] = {"onUnavailable": "sometimes"}

    with pytest.raises(ConfigError) as caught:
        load_config(config)
    problems = caught.value.problems

    assert [p.path for p in problems] == [
        "tenant.tiers[1].rateLimit",
        "models[2].costPerOutputToken",
        "endpoints[0].path",
        "redis.onUnavailable",
    ]
    found = {p.path: p.found for p in problems}
    assert "'fast'" in found["tenant.tiers[1].rateLimit"]
    assert "'cheap'" in found["models[2].costPerOutputToken"]
    assert "'ai/premium'" in found["endpoints[0].path"]
    assert "'sometimes'" in found["redis.onUnavailable"]
    assert all(p.expected and p.found for p in problems)
    message = str(caught.value)
    assert message.startswith("4 configuration problems")
    for p in problems:
        assert f"{p.path}: expected {p.expected}, found {p.found}" in message


@pytest.mark.parametrize(("place", "path"), [
    (lambda c: c.update(routes=[]), "routes"),
    (lambda c: c["tenant"]["tiers"][0].update(monthlyQuotas=5), "tenant.tiers[0].monthlyQuotas"),
    (lambda c: c["models"][1].update(cost=1), "models[1].cost"),
    (lambda c: c["redis"].update(host="localhost"), "redis.host"),
])
def test_unknown_keys_are_reported_by_path(place: Any, path: str) -> None:
    config = base()
    place(config)

    problem = problems_of(config)[path]

    assert "unknown key" in problem.found


@pytest.mark.parametrize("written", [
    "sk-live-7f3a9c2e1d",                       # a plaintext key pasted by mistake
    "sha256:" + "ab" * 31,                      # 62 hex digits
    "sha256:" + "AB" * 32,                      # upper case
    "md5:" + "ab" * 16,
])
def test_an_api_key_that_is_not_a_sha256_digest_is_reported_without_its_value(
        written: str) -> None:
    config = base()
    config["tenants"][1]["apiKeys"] = [sha("fine"), written]

    with pytest.raises(ConfigError) as caught:
        load_config(config)

    assert [p.path for p in caught.value.problems] == ["tenants[1].apiKeys[1]"]
    assert "sha256" in caught.value.problems[0].expected
    secret_part = written.split(":")[-1]
    assert secret_part not in str(caught.value)
    assert secret_part not in repr(caught.value.problems)


def test_a_tenant_on_an_unknown_tier() -> None:
    config = base()
    config["tenants"][0]["tier"] = "gold"

    problem = problems_of(config)["tenants[0].tier"]

    assert "'gold'" in problem.found
    assert "free" in problem.expected and "enterprise" in problem.expected


def test_a_tier_allowing_a_model_without_a_profile() -> None:
    config = base()
    config["tenant"]["tiers"][1]["allowedModels"].append("model-huge")

    problem = problems_of(config)["tenant.tiers[1].allowedModels[3]"]

    assert "'model-huge'" in problem.found


@pytest.mark.parametrize(("section", "field", "path"), [
    ("tenants", "id", "tenants[1].id"),
    ("models", "id", "models[1].id"),
])
def test_duplicate_ids(section: str, field: str, path: str) -> None:
    config = base()
    config[section][1][field] = config[section][0][field]

    assert "duplicate" in problems_of(config)[path].found


def test_duplicate_tier_names() -> None:
    config = base()
    config["tenant"]["tiers"][2]["name"] = "pro"

    assert "duplicate 'pro'" in problems_of(config)["tenant.tiers[2].name"].found


def test_one_key_hash_on_two_tenants() -> None:
    config = base()
    config["tenants"][1]["apiKeys"] = list(config["tenants"][0]["apiKeys"])

    problem = problems_of(config)["tenants[1].apiKeys[0]"]

    assert "'acme'" in problem.found


@pytest.mark.parametrize("tenant_id", ["a:b", "{s1}", "acme*", "", "x" * 65, "a b"])
def test_tenant_ids_outside_the_safe_alphabet_are_refused(tenant_id: str) -> None:
    config = base()
    config["tenants"][0]["id"] = tenant_id

    assert "tenants[0].id" in problems_of(config)


def test_a_key_prefix_with_braces_is_refused() -> None:
    config = base()
    config["redis"] = {"keyPrefix": "app{x}"}

    assert "redis.keyPrefix" in problems_of(config)


def test_yaml_syntax_error_is_a_config_error_naming_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "tenant:\n  tiers:\n    - name: free\n      rateLimit: [1\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    (problem,) = caught.value.problems
    assert problem.path.startswith("line ")
    assert problem.expected == "valid YAML"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert "Traceback" not in str(caught.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError) as caught:
        load_config(missing)

    (problem,) = caught.value.problems
    assert problem.path == str(missing)
    assert "No such file" in problem.found


def test_a_source_that_is_not_a_config_at_all() -> None:
    assert problems_of(42)["config"].found == "number 42"
    assert problems_of([1, 2])["config"].found == "a list"


# --------------------------------------------------------------------------- LiteLLM catalog


LITELLM = {
    "sample_spec": {"max_tokens": "LEGACY parameter. set to max_output_tokens if provider "
                                  "specifies it", "input_cost_per_token": 0.0},
    "gpt-4o-mini": {"max_tokens": 16384, "max_input_tokens": 128000, "max_output_tokens": 16384,
                    "input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07,
                    "litellm_provider": "openai", "mode": "chat"},
    "claude-3-5-sonnet-20241022": {"max_tokens": 8192, "max_input_tokens": 200000,
                                   "input_cost_per_token": 3e-06,
                                   "output_cost_per_token": 1.5e-05,
                                   "litellm_provider": "anthropic", "mode": "chat"},
}


def catalog_config(tmp_path: Path, models: list[dict[str, Any]]) -> Path:
    (tmp_path / "prices.json").write_text(json.dumps(LITELLM), "utf-8")
    doc = {
        "tenant": {"tiers": [{"name": "pro", "monthlyQuota": 1000, "rateLimit": 10,
                              "allowedModels": [m["id"] for m in models]}]},
        "modelCatalog": "prices.json",  # relative to the YAML file
        "models": models,
    }
    return write(tmp_path, json.dumps(doc))  # JSON is YAML


def test_a_litellm_cost_map_fills_prices_provider_and_context_window(tmp_path: Path) -> None:
    path = catalog_config(tmp_path, [
        {"id": "gpt-4o-mini", "qualityScore": 0.6, "latencyP99Ms": 900},
        {"id": "claude-3-5-sonnet-20241022", "qualityScore": 0.9, "latencyP99Ms": 3000,
         "costPerOutputToken": "0.000014"},  # a negotiated price wins over the catalog
    ])

    models = load_config(path).models

    mini = models["gpt-4o-mini"]
    assert mini.provider == "openai"
    assert mini.cost_per_input_token == Decimal("0.00000015")
    assert mini.cost_per_output_token == Decimal("0.0000006")
    assert type(mini.cost_per_input_token) is Decimal
    assert mini.max_tokens == 128000  # max_input_tokens, the context window
    sonnet = models["claude-3-5-sonnet-20241022"]
    assert sonnet.provider == "anthropic"
    assert sonnet.cost_per_input_token == Decimal("0.000003")
    assert sonnet.cost_per_output_token == Decimal("0.000014")


def test_a_model_neither_in_the_catalog_nor_priced_is_reported(tmp_path: Path) -> None:
    path = catalog_config(tmp_path, [{"id": "model-unknown", "qualityScore": 0.5,
                                      "latencyP99Ms": 100}])

    problems = problems_of(path)

    assert {"models[0].provider", "models[0].costPerInputToken",
            "models[0].costPerOutputToken", "models[0].maxTokens"} <= set(problems)


def test_an_unreadable_catalog_is_reported(tmp_path: Path) -> None:
    config = base()
    config["modelCatalog"] = str(tmp_path / "missing.json")

    assert "missing.json" in problems_of(config)["modelCatalog"].found


# --------------------------------------------------------------------------- ai-saas check-config


def test_check_config_summarises_a_good_file(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, SEED_TEXT + SERVING_SECTIONS)

    code = main(["check-config", str(path)])

    out, err = capsys.readouterr()
    assert code == 0
    assert err == ""
    assert "is valid" in out
    for name in ("free", "pro", "enterprise", "model-small", "model-custom", "/ai/*"):
        assert name in out
    assert "still lacks" not in out


def test_check_config_of_the_seed_says_what_serving_still_lacks(
        seed_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check-config", str(seed_path)])

    out, _ = capsys.readouterr()
    assert code == 0
    assert "still lacks" in out
    assert "no endpoints" in out


def test_check_config_lists_every_problem_of_a_broken_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = SEED_TEXT \
        .replace("rateLimit: 100\n", "rateLimit: lots\n") \
        .replace("resetTimeout: 30s", "resetTimeout: soon") \
        .replace("similarityThreshold: 0.85", "similarityThreshold: 1.85") \
        .replace("usageMetric:", "usageMetrik:")
    path = write(tmp_path, text)

    code = main(["check-config", str(path)])

    out, err = capsys.readouterr()
    assert code == 2
    assert "4 configuration problems" in err
    for where in ("tenant.tiers[1].rateLimit", "routing.circuitBreaker.resetTimeout",
                  "cache.similarityThreshold", "billing.usageMetrik"):
        assert where in err
    assert "Traceback" not in out + err


@pytest.mark.parametrize("text", ["tenant: [unclosed\n", None])
def test_check_config_of_bad_yaml_or_a_missing_file_exits_2_without_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None) -> None:
    path = write(tmp_path, text) if text is not None else tmp_path / "missing.yaml"

    code = main(["check-config", str(path)])

    out, err = capsys.readouterr()
    assert code == 2
    assert str(path) in err
    assert "Traceback" not in out + err


def test_check_config_piped_into_a_reader_that_leaves_early_prints_no_traceback(
        tmp_path: Path) -> None:
    import subprocess
    import sys

    # A summary far larger than a pipe's buffer, so the write really meets a closed pipe.
    tiers = "\n".join(f"    - {{name: tier{i}, monthlyQuota: 1000, rateLimit: 10, "
                      f"allowedModels: [m{i}]}}" for i in range(3000))
    config = write(tmp_path, f"tenant:\n  tiers:\n{tiers}\n", "big.yaml")
    # `ai-saas check-config FILE | head -c 10`: the reader leaves after ten bytes
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ai_saas_middleware.cli import main; "
         "sys.exit(main())", "check-config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.read(10)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0
    assert "Traceback" not in stderr
    assert first == b"Configurat"


# ------------------------------------------------------------------- check-config: first files


def check_config_errors(path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """``ai-saas check-config PATH`` on a broken file: its problem lines (exit 2, nothing
    on stdout, no traceback, one line per problem after the count)."""
    code = main(["check-config", str(path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    head, *lines = err.strip().splitlines()
    assert head.endswith(f"in {path}:")
    assert lines and all(line.startswith("  - ") for line in lines)
    return [line[len("  - "):] for line in lines]


@pytest.mark.parametrize("text", ["", "\n\n", "# ai-saas-config.yaml, to be written\n", "---\n"])
def test_an_empty_file_is_an_error_not_a_valid_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    [line] = check_config_errors(write(tmp_path, text), capsys)

    assert line.startswith("(top level): expected a mapping of configuration sections (")
    assert line.endswith("found nothing: the file is empty")


@pytest.mark.parametrize(("text", "found"), [
    ("- tenant\n- models\n", "a list"),
    ("tenant\n", "string 'tenant'"),
    ("42\n", "number 42"),
])
def test_a_top_level_that_is_not_a_mapping_is_reported_at_the_top_level(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, found: str) -> None:
    [line] = check_config_errors(write(tmp_path, text), capsys)

    assert line.startswith("(top level): expected a mapping of configuration sections (tenant")
    assert line.endswith(f"found {found}")


def test_an_unknown_top_level_key_keeps_its_own_path() -> None:
    config = base()
    config["tenantz"] = {}

    assert "unknown key 'tenantz'" in problems_of(config)["tenantz"].found


def test_endpoint_methods_must_be_http_methods(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    text = SEED_TEXT + "endpoints:\n  - {path: /ai/*, methods: [POST, FETCH, 7]}\n"

    lines = check_config_errors(write(tmp_path, text), capsys)

    assert sorted(lines) == [
        "endpoints[0].methods[1]: expected an HTTP method (GET, POST, PUT, PATCH, DELETE, "
        "HEAD, OPTIONS), found string 'FETCH'",
        "endpoints[0].methods[2]: expected a non-empty string, found number 7"]


def test_endpoint_methods_are_read_in_any_case_and_kept_upper_case() -> None:
    config = base()
    config["endpoints"] = [{"path": "/ai/*", "methods": ["post", "Get", "OPTIONS", "head",
                                                         "put", "patch", "delete"]}]

    [endpoint] = load_config(config).endpoints

    assert endpoint.methods == frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD",
                                          "OPTIONS"})
    assert endpoint.matches("POST", "/ai/chat") and not endpoint.matches("post", "/ai/chat")


# Suffixes a user might try; the parser's own answer says which it accepts.
_UNIT_CANDIDATES = ("ns", "us", "ms", "s", "sec", "m", "min", "h", "hr", "d", "w", "y")


def test_the_duration_hint_shows_every_unit_the_parser_accepts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import re

    accepted = []
    for unit in _UNIT_CANDIDATES:
        config = base()
        config["redis"] = {"retryInterval": f"2{unit}"}
        try:
            load_config(config)
        except ConfigError:
            continue
        accepted.append(unit)
    assert {"ms", "s", "m", "h"} <= set(accepted)
    [line] = check_config_errors(write(tmp_path, SEED_TEXT.replace("resetTimeout: 30s",
                                                                   "resetTimeout: soon")),
                                 capsys)

    hint = line.split(": expected ", 1)[1]
    shown = set(re.findall(r"\b\d+([a-z]+)\b", hint))
    assert shown == set(accepted), hint
    assert "plain seconds" in hint


@pytest.mark.parametrize(("routing", "path"), [
    ({"circuitBreaker": {"resetTimeout": 0}}, "routing.circuitBreaker.resetTimeout"),
    ({"circuitBreaker": {"window": "0s"}}, "routing.circuitBreaker.window"),
    ({"circuitBreaker": {"errorThreshold": 0}}, "routing.circuitBreaker.errorThreshold"),
    ({"downgradeAt": 0}, "routing.downgradeAt"),
    ({"downgradeAt": "1.5"}, "routing.downgradeAt"),
    ({"defaultResponse": {"text": "busy"}}, "routing.defaultResponse"),
    ({"useObservedLatency": "yes"}, "routing.useObservedLatency"),
    ({"strategy": "fastest"}, "routing.strategy"),
])
def test_routing_values_that_cannot_work_are_refused_naming_their_path(routing, path) -> None:
    config = base()
    config["routing"] = routing

    with pytest.raises(ConfigError) as caught:
        load_config(config)

    assert [p.path for p in caught.value.problems] == [path]


def test_the_routing_keys_are_read() -> None:
    config = base()
    config["routing"] = {"strategy": "latency_first", "downgradeAt": "0.8",
                         "defaultResponse": "busy", "useObservedLatency": True,
                         "circuitBreaker": {"window": "10s"}}

    routing = load_config(config).routing

    assert (routing.strategy, routing.downgrade_at, routing.default_response,
            routing.use_observed_latency, routing.circuit_breaker.window_s) == (
        "latency_first", Decimal("0.8"), "busy", True, 10.0)
