"""``ai-saas init``: a starter configuration a new user can serve from as written.

The file is the seed template plus what serving needs; ``check-config`` accepts it (in
process and through the installed console script), a Gateway built from it admits one
of the printed keys against the real test Redis and refuses a wrong one, and no key is
ever written to disk in clear.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_config import SEED_TEXT

from ai_saas_middleware import Gateway, load_config
from ai_saas_middleware.cli import main
from ai_saas_middleware.config import serving_gaps
from ai_saas_middleware.starter import SEED_SECTIONS, render_starter
from ai_saas_middleware.types import Outcome, RequestInfo

# The console script pip installed beside this interpreter (/work/main/.venv/bin/ai-saas).
AI_SAAS = Path(sys.executable).parent / "ai-saas"
SHARED_SEED = Path(__file__).resolve().parents[2] / "shared" / "seed-config.yaml"
SEED_KEYS = ("tenant", "routing", "cache", "billing")
KEY_LINE = re.compile(r"^(\S+)\s+(\S+)\s+(ais_[0-9a-f]{32}_\S+)$", re.M)
REDIS_URL_NOTE = "no redis.url: REDIS_URL or redis://127.0.0.1:6379/0 will be used"


@pytest.fixture(autouse=True)
def _no_config_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AI_SAAS_CONFIG", raising=False)
    # A gateway's spool directory goes under the test's own state directory.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def printed_keys(out: str) -> dict[str, tuple[str, str]]:
    """tenant id -> (tier, API key), from what ``ai-saas init`` printed."""
    return {m[1]: (m[2], m[3]) for m in KEY_LINE.finditer(out)}


def init(path: Path, capsys: pytest.CaptureFixture[str], *extra: str
         ) -> dict[str, tuple[str, str]]:
    assert main(["init", str(path), *extra]) == 0
    out = capsys.readouterr().out
    assert "shown once, store it now" in out
    return printed_keys(out)


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert AI_SAAS.exists(), f"{AI_SAAS} is missing: install the package (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if k != "AI_SAAS_CONFIG"}
    return subprocess.run([str(AI_SAAS), *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=env)


def chat_request(key: str) -> RequestInfo:
    body = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 50})
    return RequestInfo("POST", "/ai/chat", {"authorization": f"Bearer {key}",
                                            "content-type": "application/json"}, body.encode())


# --------------------------------------------------------------------------- the file


def test_the_starter_is_the_seed_template_plus_what_serving_needs(tmp_path: Path) -> None:
    path = tmp_path / "ai-saas-config.yaml"
    path.write_text(render_starter().text, "utf-8")
    raw: dict[str, Any] = yaml.safe_load(path.read_text("utf-8"))

    # The seed template's four sections, verbatim in meaning (and in text).
    seed = yaml.safe_load(SEED_TEXT)
    assert {k: raw[k] for k in SEED_KEYS} == {k: seed[k] for k in SEED_KEYS}
    assert SEED_SECTIONS in SEED_TEXT
    if SHARED_SEED.exists():
        shared = yaml.safe_load(SHARED_SEED.read_text("utf-8"))
        assert {k: raw[k] for k in SEED_KEYS} == shared

    config = load_config(path)
    # A profile for each model a tier names, with exact per-token prices.
    named = {m for tier in config.tiers.values() for m in tier.allowed_models}
    assert named == set(config.models) == {"model-fast", "model-small", "model-medium",
                                           "model-large", "model-custom"}
    for model in config.models.values():
        assert isinstance(model.cost_per_input_token, Decimal)
        assert Decimal("0") < model.cost_per_input_token <= model.cost_per_output_token \
            < Decimal("0.0001")
        assert model.max_tokens >= 100_000 and 0 < model.quality_score <= 1
        assert model.latency_p99_ms > 0
    for entry in raw["models"]:  # decimal strings: exact in any YAML tool
        assert isinstance(entry["costPerInputToken"], str)
        assert isinstance(entry["costPerOutputToken"], str)
    assert "pricing" in path.read_text("utf-8")  # where the prices come from
    # One tenant per tier, an AI endpoint, and Redis left to REDIS_URL / localhost.
    assert sorted(t.tier for t in config.tenants.values()) == sorted(config.tiers)
    assert [e.path for e in config.endpoints] == ["/ai/*"]
    assert config.redis.url is None and config.redis.key_prefix == "aisaas"
    assert serving_gaps(config) == [REDIS_URL_NOTE]


def test_init_writes_a_file_check_config_accepts_as_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ai-saas-config.yaml"
    keys = init(path, capsys)
    assert sorted(tier for tier, _ in keys.values()) == ["enterprise", "free", "pro"]

    assert main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"Configuration {path} is valid." in out and err == ""
    lacks = out[out.index("still lacks:"):].splitlines()[1:] if "still lacks:" in out else []
    assert lacks == [f"  - {REDIS_URL_NOTE}"]


def test_init_prints_each_key_once_and_writes_only_its_digest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ai-saas-config.yaml"
    assert main(["init", str(path)]) == 0
    out = capsys.readouterr().out
    keys = printed_keys(out)
    text = path.read_text("utf-8")
    config = load_config(path)

    assert len(keys) == 3
    for tenant_id, (tier, key) in keys.items():
        assert out.count(key) == 1
        assert key not in text and key.split("_")[1] not in text
        digest = hashlib.sha256(key.encode()).hexdigest()
        assert config.tenants[tenant_id].api_key_hashes == (digest,)
        assert config.tenants[tenant_id].tier == tier
    # Nothing else of the run was left on disk beside the file.
    assert [p.name for p in tmp_path.iterdir() if p.name != "state"] == [path.name]

    # Every run makes new keys.
    again = init(tmp_path / "other.yaml", capsys)
    assert not {k for _, k in again.values()} & {k for _, k in keys.values()}


def test_a_gateway_from_the_starter_admits_a_printed_key_and_refuses_a_wrong_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_server_url: str,
        key_prefix: str) -> None:
    path = tmp_path / "ai-saas-config.yaml"
    keys = init(path, capsys)
    # The test's own key prefix on the shared test Redis; nothing else changed.
    text = path.read_text("utf-8")
    assert text.count("  keyPrefix: aisaas\n") == 1
    path.write_text(text.replace("  keyPrefix: aisaas\n", f"  keyPrefix: {key_prefix}\n"),
                    "utf-8")

    gateway = Gateway(path, redis_url=redis_server_url)
    try:
        for tenant_id, (tier, key) in keys.items():
            decision = gateway.admit(chat_request(key))
            assert (decision.status, decision.allowed) == (200, True), decision.body
            assert decision.context is not None and decision.ticket is not None
            assert (decision.context.tenant_id, decision.context.tier) == (tenant_id, tier)
            assert decision.context.model.id in gateway.config.tiers[tier].allowed_models
            gateway.settle(decision.ticket, Outcome(status=200, provider_usage=(5, 7)),
                           decision.context)

        wrong = gateway.admit(chat_request("ais_" + "0" * 32 + "_example-free"))
        assert (wrong.status, wrong.allowed) == (401, False)
        assert json.loads(wrong.body)["error"]["code"] == "invalid_api_key"
    finally:
        gateway.close()


# --------------------------------------------------------------------------- the command


def test_init_refuses_an_existing_file_unless_force(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ai-saas-config.yaml"
    path.write_text("# my own config\n", "utf-8")
    path.chmod(0o640)

    assert main(["init", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("ai-saas: ") and str(path) in err and "--force" in err
    assert path.read_text("utf-8") == "# my own config\n"

    keys = init(path, capsys, "--force")
    assert len(keys) == 3 and load_config(path).tenants
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # its permissions are kept
    assert [p.name for p in tmp_path.iterdir() if p.name != "state"] == [path.name]


def test_init_into_a_directory_writes_the_default_file_name_in_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    init(tmp_path, capsys)
    assert load_config(tmp_path / "ai-saas-config.yaml").tenants


def test_init_into_a_missing_directory_is_one_line_and_exit_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nowhere" / "ai-saas-config.yaml"

    assert main(["init", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"ai-saas: cannot write {path}: ")
    assert not path.parent.exists()


def test_init_writes_where_the_other_commands_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """With no PATH: $AI_SAAS_CONFIG when set, else ./ai-saas-config.yaml, the file that
    check-config then reads by default."""
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    assert (tmp_path / "ai-saas-config.yaml").is_file()
    capsys.readouterr()

    other = tmp_path / "elsewhere.yaml"
    monkeypatch.setenv("AI_SAAS_CONFIG", str(other))
    assert main(["init"]) == 0 and other.is_file()
    capsys.readouterr()
    assert main(["check-config"]) == 0
    assert f"Configuration {other} is valid." in capsys.readouterr().out


def test_the_console_script_writes_a_file_its_check_config_accepts(tmp_path: Path) -> None:
    first = run_script("init", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    keys = printed_keys(first.stdout)
    assert len(keys) == 3
    path = tmp_path / "ai-saas-config.yaml"
    text = path.read_text("utf-8")
    assert not any(key in text for _, key in keys.values())

    check = run_script("check-config", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "Configuration ai-saas-config.yaml is valid." in check.stdout

    again = run_script("init", cwd=tmp_path)
    assert again.returncode == 2 and again.stdout == ""
    assert len(again.stderr.strip().splitlines()) == 1 and "--force" in again.stderr
    assert path.read_text("utf-8") == text
