"""``ai-saas models list|set|reset``: the price book from the command line, against the
real test Redis, in-process through ``cli.main`` (with capsys) and once through the
installed console script in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from ai_saas_middleware.cli import main
from ai_saas_middleware.config import load_config
from ai_saas_middleware.pricebook import PriceBookAdmin
from ai_saas_middleware.store.redis import RedisStore

AI_SAAS = Path(sys.executable).parent / "ai-saas"


@pytest.fixture
def config_file(make_config: Callable[..., dict[str, Any]], tmp_path: Path) -> str:
    path = tmp_path / "ai-saas-config.yaml"
    path.write_text(yaml.safe_dump(make_config()), encoding="utf-8")
    return str(path)


@pytest.fixture
def run(config_file: str, capsys: pytest.CaptureFixture[str]
        ) -> Callable[..., tuple[int, str, str]]:
    def run(*args: str) -> tuple[int, str, str]:
        code = main(["models", *args, "-c", config_file])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    return run


def book(config_file: str) -> Any:
    config = load_config(config_file)
    store = RedisStore(config.redis)
    try:
        return PriceBookAdmin(config, store).read()[0]
    finally:
        store.close()


def row(out: str, model: str) -> list[str]:
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] == model:
            return cells
    raise AssertionError(f"no row for {model} in:\n{out}")


def test_list_shows_the_configurations_profiles_at_version_0(run):
    code, out, _err = run("list")
    assert code == 0
    assert out.startswith("price book version 0 (the configuration's profiles)")
    assert row(out, "model-small")[1:4] == ["openai", "0.00000015", "0.0000006"]
    assert row(out, "model-small")[-2:] == ["enabled", "-"]


def test_set_prices_per_million_makes_a_new_version_list_shows_it(run, config_file):
    code, out, _err = run("set", "model-small", "--input-price", "0.2", "--output-price",
                          "0.8", "--per-million")
    assert code == 0 and "price book version 1" in out
    snapshot = book(config_file)
    small = snapshot.models["model-small"]
    assert (small.cost_per_input_token, small.cost_per_output_token) == \
        (Decimal("0.0000002"), Decimal("0.0000008"))
    code, out, _err = run("list")
    assert out.startswith("price book version 1\n")
    assert row(out, "model-small")[2:4] == ["0.0000002", "0.0000008"]
    assert "costPerInputToken," in row(out, "model-small")
    code, out, _err = run("list", "--per-million")
    assert row(out, "model-small")[2:4] == ["0.2", "0.8"]


def test_disable_enable_reset_and_a_past_version(run, config_file):
    assert run("set", "model-fast", "--disable", "--latency-ms", "350")[0] == 0
    code, out, _err = run("list")
    assert row(out, "model-fast")[-3:] == ["disabled", "latencyP99Ms,", "enabled"]
    assert "model-fast" not in book(config_file).models
    assert run("set", "model-fast", "--enable")[0] == 0
    assert "model-fast" in book(config_file).models
    code, out, _err = run("reset", "model-fast")
    assert code == 0 and "price book version 3" in out
    code, out, _err = run("reset", "model-fast")
    assert code == 0 and "has no overrides" in out and "version 3" in out
    code, out, _err = run("list", "--version", "1")
    assert out.startswith("price book version 1\n")
    assert row(out, "model-fast")[6:8] == ["350", "disabled"]
    code, _out, err = run("list", "--version", "9")
    assert code == 1 and "no price book version 9" in err


@pytest.mark.parametrize("args, message", [
    (("--input-price", "abc"), "expected a price in USD"),
    (("--input-price", "-0.1"), "expected a price in USD"),
    (("--output-price", "nan"), "expected a price in USD"),
    (("--quality", "1.2"), "expected a quality score"),
    (("--latency-ms", "0"), "expected a whole number >= 1"),
    (("--max-tokens", "12k"), "expected a whole number >= 1"),
    (("--enable", "--disable"), "not allowed with argument"),
    ((), "nothing to set"),
    (("--per-million", "--quality", "0.5"), "--per-million applies to"),
    (("--provider", "openai"), "models[model-small].provider"),
])
def test_bad_input_exits_2_naming_it_and_changes_nothing(run, config_file, args,
                                                             message):
    code, _out, err = run("set", "model-small", *args)
    assert code == 2 and message in err
    assert book(config_file).version == 0


def test_a_new_model_needs_every_field(run, config_file):
    code, _out, err = run("set", "model-new", "--input-price", "1", "--per-million")
    assert code == 2
    assert "models[model-new]" in err and "provider" in err and "latencyP99Ms" in err
    code, out, err = run("set", "model-new", "--provider", "openai", "--input-price", "1",
                         "--output-price", "2", "--per-million", "--max-tokens", "8000",
                         "--quality", "0.7", "--latency-ms", "600")
    assert code == 0 and "no tier allows model-new" in out
    assert book(config_file).models["model-new"].cost_per_output_token == Decimal("0.000002")


def test_reset_of_an_unknown_model_exits_1(run):
    code, _out, err = run("reset", "model-nobody")
    assert code == 1 and "no model 'model-nobody'" in err


def test_redis_unreachable_exits_1_without_a_traceback(run):
    code, _out, err = run("list", "--redis-url", "redis://127.0.0.1:1/0")
    assert code == 1 and err.startswith("ai-saas: Redis at redis://127.0.0.1:1/0")


def test_the_console_script(config_file):
    assert AI_SAAS.exists(), f"{AI_SAAS} is missing: install the package (pip install -e .)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    bad = subprocess.run([str(AI_SAAS), "models", "set", "model-small", "--input-price",
                          "abc", "-c", config_file], capture_output=True, text=True,
                         timeout=60, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    good = subprocess.run([str(AI_SAAS), "models", "set", "model-small", "--quality", "0.64",
                           "-c", config_file], capture_output=True, text=True, timeout=60,
                          env=env)
    assert good.returncode == 0, good.stderr
    assert book(config_file).models["model-small"].quality_score == 0.64
