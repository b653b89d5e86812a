"""``ai-saas report`` and ``ai-saas billing reprice`` over a real ledger (SQLite and
PostgreSQL), against figures worked out by hand in this file; and rates.py's plans.

The generated month (2026-11) and the one before it are below (:data:`NOVEMBER`,
:data:`OCTOBER`); every expected figure is a literal, with the arithmetic that gives it
in a comment. Revenue comes from the pricing rules of :data:`BILLING`:

    input_tokens  0.00001 / token   (enterprise: 0.000005)
    output_tokens 0.00003 / token
    requests      0.01 / request    (enterprise only)
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import pty
import select as io_select
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import BASE_CONFIG
from sqlalchemy import func, select

from ai_saas_middleware import load_config
from ai_saas_middleware.billing import tables as t
from ai_saas_middleware.billing.events import Event, parse_entry
from ai_saas_middleware.billing.ledger import Ledger
from ai_saas_middleware.billing.rates import Plan, Pricing
from ai_saas_middleware.billing.reports import build_report
from ai_saas_middleware.budgets import from_picodollars
from ai_saas_middleware.cli import main
from ai_saas_middleware.config import PricingRule

ROOT = Path(__file__).resolve().parent.parent

BILLING: dict[str, Any] = {
    "pricingRules": [
        {"metric": "input_tokens", "rate": "0.00001"},
        {"metric": "output_tokens", "rate": "0.00003"},
        {"metric": "input_tokens", "rate": "0.000005", "tier": "enterprise"},
        {"metric": "requests", "rate": "0.01", "tier": "enterprise"},
    ],
    "cac": "1",  # USD, for every tenant without its own
}


def entry(rid: str, tenant: str, tier: str, model: str, ts: str, prompt: int,
          completion: int, cost: str, **extra: str) -> Event:
    """One usage event as the worker would parse it from a stream entry."""
    fields = {"request_id": rid, "tenant_id": tenant, "tier": tier, "model_id": model,
              "provider": "openai", "ts": ts, "prompt_tokens": str(prompt),
              "completion_tokens": str(completion), "cost": cost, "status": "200",
              "latency_ms": "100", **extra}
    return parse_entry(f"aisaas:{{s0}}:usage 1-{rid}", fields)


NOVEMBER = [
    # acme (free; CAC billing.cac = 1)
    #   n1  10000 x 0.00001 + 5000 x 0.00003 = 0.1 + 0.15 = 0.25
    entry("n1", "acme", "free", "model-small", "2026-11-02T10:00:00Z", 10000, 5000, "0.05"),
    #   n2  20000 x 0.00001 = 0.2; a cache hit that saved 0.03; outcome 2
    entry("n2", "acme", "free", "model-fast", "2026-11-03T10:00:00Z", 20000, 0, "0.01",
          cache="hit", saved_cost="0.03", outcome_value="2"),
    #   n3  10000 x 0.00003 = 0.3; an error (status 500) is still charged by the rules
    entry("n3", "acme", "free", "model-small", "2026-11-30T23:59:59.999Z", 0, 10000, "0.04",
          status="500"),
    # globex (pro; CAC tenants[].cac = 1.2): four models, two of them tied on cost
    #   n4  40000 x 0.00001 + 20000 x 0.00003 = 0.4 + 0.6 = 1.0
    entry("n4", "globex", "pro", "model-large", "2026-11-05T08:00:00Z", 40000, 20000, "0.25"),
    #   n5  5000 x 0.00001 = 0.05
    entry("n5", "globex", "pro", "model-medium", "2026-11-06T08:00:00Z", 5000, 0, "0.02"),
    #   n6  5000 x 0.00001 = 0.05
    entry("n6", "globex", "pro", "model-small", "2026-11-07T08:00:00Z", 5000, 0, "0.015"),
    #   n7  10000 x 0.00001 = 0.1
    entry("n7", "globex", "pro", "model-fast", "2026-11-08T08:00:00Z", 10000, 0, "0.015"),
    # initech (enterprise; CAC billing.cac = 1)
    #   n8  100000 x 0.000005 + 10000 x 0.00003 + 0.01 = 0.5 + 0.3 + 0.01 = 0.81
    entry("n8", "initech", "enterprise", "model-large", "2026-11-10T12:00:00Z", 100000, 10000,
          "0.35", outcome_value="10"),
    #   n9  100000 x 0.000005 + 0.01 = 0.51; a negative outcome (a refund, say)
    entry("n9", "initech", "enterprise", "model-large", "2026-11-11T12:00:00Z", 100000, 0,
          "0.25", outcome_value="-2"),
    # hooli (not in the configuration, pro; CAC billing.cac = 1): dearer than it pays
    #   n10 1000 x 0.00001 + 1000 x 0.00003 = 0.01 + 0.03 = 0.04
    entry("n10", "hooli", "pro", "model-large", "2026-11-15T00:00:00Z", 1000, 1000, "0.5"),
]
OCTOBER = [  # four tenants active; umbrella has no usage in November: churned
    entry("o1", "acme", "free", "model-small", "2026-10-20T00:00:00Z", 100, 0, "0.001"),
    entry("o2", "globex", "pro", "model-small", "2026-10-20T00:00:00Z", 100, 0, "0.001"),
    entry("o3", "initech", "enterprise", "model-small", "2026-10-20T00:00:00Z", 100, 0, "0.001"),
    entry("o4", "umbrella", "pro", "model-small", "2026-10-31T23:59:59Z", 100, 0, "0.001"),
]
DECEMBER = [  # outside the period: must not count
    entry("d1", "acme", "free", "model-small", "2026-12-01T00:00:00Z", 999, 999, "9"),
]

# Observed churn: 1 (umbrella) of the 4 tenants with usage in 2026-10 has none in 2026-11
# = 0.25. LTV = gross profit / 0.25 = 4 x gross profit.
EXPECTED: dict[str, dict[str, Any]] = {
    "acme": {
        "requests": 3, "errors": 1, "prompt_tokens": 30000, "completion_tokens": 15000,
        "cost": "0.1",  # 0.05 + 0.01 + 0.04
        "revenue": "0.75",  # 0.25 + 0.2 + 0.3
        "gross_profit": "0.65",  # 0.75 - 0.1
        "margin": "0.866667",  # 0.65 / 0.75 = 0.8666..., 6 places half-even
        "saved": "0.03", "cache_hits": 1,
        "top_models": [{"model_id": "model-small", "requests": 2, "cost": "0.09"},
                       {"model_id": "model-fast", "requests": 1, "cost": "0.01"}],
        "outcome_value": "2", "outcomes": 1,
        "cost_per_outcome": "0.05",  # 0.1 / 2
        "churn": "0.25",
        "ltv": "2.6",  # 0.65 / 0.25
        "cac": "1", "cac_source": "billing.cac",
        "ltv_cac": "2.6",  # 2.6 / 1: below 3
        "flags": ["ltv_cac_below_3"],
    },
    "globex": {
        "requests": 4, "errors": 0, "prompt_tokens": 60000, "completion_tokens": 20000,
        "cost": "0.3",  # 0.25 + 0.02 + 0.015 + 0.015
        "revenue": "1.2",  # 1.0 + 0.05 + 0.05 + 0.1
        "gross_profit": "0.9",
        "margin": "0.75",  # 0.9 / 1.2
        "saved": "0", "cache_hits": 0,
        # by cost, then id: model-fast and model-small tie at 0.015, model-fast comes first
        "top_models": [{"model_id": "model-large", "requests": 1, "cost": "0.25"},
                       {"model_id": "model-medium", "requests": 1, "cost": "0.02"},
                       {"model_id": "model-fast", "requests": 1, "cost": "0.015"}],
        "outcome_value": "0", "outcomes": 0, "cost_per_outcome": None,
        "churn": "0.25",
        "ltv": "3.6",  # 0.9 / 0.25
        "cac": "1.2", "cac_source": "tenants[].cac",
        "ltv_cac": "3",  # 3.6 / 1.2 = 3 exactly: at the line, not below it
        "flags": [],
    },
    "hooli": {
        "requests": 1, "errors": 0, "prompt_tokens": 1000, "completion_tokens": 1000,
        "cost": "0.5", "revenue": "0.04",
        "gross_profit": "-0.46",  # 0.04 - 0.5
        "margin": "-11.5",  # -0.46 / 0.04
        "saved": "0", "cache_hits": 0,
        "top_models": [{"model_id": "model-large", "requests": 1, "cost": "0.5"}],
        "outcome_value": "0", "outcomes": 0, "cost_per_outcome": None,
        "churn": "0.25",
        "ltv": "-1.84",  # -0.46 / 0.25
        "cac": "1", "cac_source": "billing.cac",
        "ltv_cac": "-1.84",
        "flags": ["ltv_cac_below_3", "negative_margin"],
    },
    "initech": {
        "requests": 2, "errors": 0, "prompt_tokens": 200000, "completion_tokens": 10000,
        "cost": "0.6",  # 0.35 + 0.25
        "revenue": "1.32",  # 0.81 + 0.51
        "gross_profit": "0.72",
        "margin": "0.545455",  # 0.72 / 1.32 = 0.545454..., half-even to 6 places
        "saved": "0", "cache_hits": 0,
        "top_models": [{"model_id": "model-large", "requests": 2, "cost": "0.6"}],
        "outcome_value": "8", "outcomes": 2,  # 10 - 2
        "cost_per_outcome": "0.075",  # 0.6 / 8
        "churn": "0.25",
        "ltv": "2.88",  # 0.72 / 0.25
        "cac": "1", "cac_source": "billing.cac",
        "ltv_cac": "2.88",
        "flags": ["ltv_cac_below_3"],
    },
}


def config_dict(ledger_url: str, **billing: Any) -> dict[str, Any]:
    config = copy.deepcopy(BASE_CONFIG)
    config["billing"] = {**copy.deepcopy(BILLING), "database": ledger_url, **billing}
    for tenant in config["tenants"]:
        if tenant["id"] == "globex":
            tenant["cac"] = "1.2"
    return config


def write_config(tmp_path: Path, ledger_url: str, **billing: Any) -> str:
    path = tmp_path / f"ai-saas-config-{len(list(tmp_path.glob('ai-saas-config-*')))}.yaml"
    path.write_text(yaml.safe_dump(config_dict(ledger_url, **billing)), "utf-8")
    return str(path)


def record(ledger_url: str, events: list[Event], **billing: Any) -> None:
    """Put ``events`` in the ledger as the worker does: priced by ``billing``'s rules."""
    ledger = Ledger(ledger_url)
    try:
        ledger.migrate()
        pricing = Pricing(load_config(config_dict(ledger_url, **billing)).billing)
        ledger.register(pricing)
        ledger.record(copy.deepcopy(events), pricing)
    finally:
        ledger.close()


@pytest.fixture
def month(ledger_url: str, tmp_path: Path) -> str:
    """The ledger with October, November and December recorded; the config file's path."""
    record(ledger_url, OCTOBER)
    record(ledger_url, NOVEMBER)
    record(ledger_url, DECEMBER)
    return write_config(tmp_path, ledger_url)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


# ---------------------------------------------------------------- the report's figures

def test_json_report_equals_the_hand_calculation(month: str, capsys: pytest.CaptureFixture[str]
                                                 ) -> None:
    status, out, err = run(["report", "-c", month, "--period", "2026-11", "--format", "json"],
                           capsys)
    assert status == 0, err
    tenants = json.loads(out)  # stdout is the list alone
    assert [r["tenant_id"] for r in tenants] == ["acme", "globex", "hooli", "initech"]
    for row in tenants:
        assert {k: v for k, v in row.items() if k != "tenant_id"} == EXPECTED[row["tenant_id"]]
    # Every assumption is said, on stderr.
    assert "# assumption: churn 0.25 a month: observed (1 of the 4 tenants with usage in " \
           "2026-10 have none in 2026-11)" in err
    assert "gross profit (revenue - inference cost) / churn" in err
    assert "CAC: tenants[].cac, else billing.cac (1)" in err


def test_csv_report_equals_the_hand_calculation(month: str, capsys: pytest.CaptureFixture[str]
                                                ) -> None:
    status, out, err = run(["report", "-c", month, "--period", "2026-11", "--format", "csv"],
                           capsys)
    assert status == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["tenant_id"] for r in rows] == ["acme", "globex", "hooli", "initech"]
    for row in rows:
        want = EXPECTED[row["tenant_id"]]
        for name, value in want.items():
            if name == "top_models":
                assert row[name] == ";".join(m["model_id"] for m in value)
            elif name == "flags":
                assert row[name] == ";".join(value)
            else:
                assert row[name] == ("" if value is None else str(value)), name
    assert "# assumption: churn 0.25 a month: observed" in err


def test_table_report_equals_the_hand_calculation(month: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["report", "-c", month, "--period", "2026-11"], capsys)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == "report 2026-11: 4 tenants"
    assert "  assumption: churn 0.25 a month: observed (1 of the 4 tenants with usage in " \
           "2026-10 have none in 2026-11)" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("tenant "))
    assert lines[header].split() == [
        "tenant", "requests", "tokens_in", "tokens_out", "cost", "revenue", "margin", "saved",
        "hits", "outcome", "cost/outcome", "ltv", "cac", "ltv/cac", "top_models", "flags"]
    cells = {line.split()[0]: line.split() for line in lines[header + 1:]}
    # margin as a percentage to 0.01: 0.65 / 0.75 = 86.666...% -> 86.67%
    assert cells["acme"] == ["acme", "3", "30000", "15000", "0.1", "0.75", "86.67%", "0.03",
                             "1", "2", "0.05", "2.6", "1", "2.6", "model-small,model-fast",
                             "ltv_cac_below_3"]
    assert cells["globex"] == ["globex", "4", "60000", "20000", "0.3", "1.2", "75.00%", "0",
                               "0", "0", "-", "3.6", "1.2", "3",
                               "model-large,model-medium,model-fast", "-"]
    assert cells["hooli"][6] == "-1150.00%"  # -0.46 / 0.04
    assert cells["hooli"][-1] == "ltv_cac_below_3,negative_margin"
    assert cells["initech"][6] == "54.55%"  # 0.72 / 1.32 = 54.5454...%


def test_report_as_a_subprocess(month: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "ai_saas_middleware.cli", "report", "-c",
                           month, "--period", "2026-11", "--format", "json", "--tenant",
                           "initech"], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"tenant_id": "initech", **EXPECTED["initech"]}]
    assert "\r" not in done.stderr  # piped: no progress bar
    assert "Traceback" not in done.stderr


def test_cac_file_overrides_the_configuration(month: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cac = tmp_path / "cac.csv"
    cac.write_text("tenant_id,cac\nacme,0.5\nglobex,0\n", "utf-8")
    status, out, err = run(["report", "-c", month, "--period", "2026-11", "--format", "json",
                            "--cac-file", str(cac)], capsys)
    assert status == 0, err
    rows = {r["tenant_id"]: r for r in json.loads(out)}
    # acme: 2.6 / 0.5 = 5.2, above 3 now: no flag
    assert (rows["acme"]["cac"], rows["acme"]["cac_source"], rows["acme"]["ltv_cac"],
            rows["acme"]["flags"]) == ("0.5", "--cac-file", "5.2", [])
    # globex: a CAC of 0 gives no ratio (and so no flag); said on stderr
    assert (rows["globex"]["cac"], rows["globex"]["ltv_cac"], rows["globex"]["flags"]) == \
        ("0", None, [])
    assert "no LTV/CAC (no CAC, or a CAC of 0) for globex" in err
    assert rows["initech"]["cac_source"] == "billing.cac"  # not in the file


@pytest.mark.parametrize("content, says", [
    ("acme,lots\n", "cac.csv:1: expected a CAC in USD of at least 0, found 'lots'"),
    ("tenant_id,cac\nacme\n", "cac.csv:2: expected tenant_id,cac"),
    ("acme,1\nacme,2\n", "cac.csv:2: tenant 'acme' appears twice"),
    ("acme,-1\n", "cac.csv:1: expected a CAC in USD of at least 0, found '-1'"),
    # Bounded as billing.cac is: a CAC finer than a picodollar would put LTV/CAC past
    # the precision money is worked out in.
    ("acme,1e-50\n", "cac.csv:1: expected a CAC in USD with at most 12 decimal places, "
                     "found '1e-50'"),
    ("acme,9000000.5\n", "cac.csv:1: expected a CAC in USD of at most 9000000, found "
                         "'9000000.5'"),
])
def test_a_bad_cac_file_is_one_line_and_exit_2(month: str, tmp_path: Path, content: str,
                                               says: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cac = tmp_path / "cac.csv"
    cac.write_text(content, "utf-8")
    status, out, err = run(["report", "-c", month, "--period", "2026-11", "--cac-file",
                            str(cac)], capsys)
    assert (status, out) == (2, "")
    assert says in err and "Traceback" not in err


def test_fail_below_exits_3_and_lists_the_tenants(month: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["report", "-c", month, "--period", "2026-11", "--format", "json",
                            "--fail-below", "3"], capsys)
    assert status == 3
    assert len(json.loads(out)) == 4  # the report is printed all the same
    # globex is at 3 exactly: not below
    assert ("ai-saas: 3 tenants below LTV/CAC 3 in 2026-11: acme (2.6), hooli (-1.84), "
            "initech (2.88)") in err
    status, _, err = run(["report", "-c", month, "--period", "2026-11", "--fail-below",
                          "2.7"], capsys)
    assert status == 3 and "2 tenants below LTV/CAC 2.7" in err  # acme and hooli
    status, _, err = run(["report", "-c", month, "--period", "2026-11", "--fail-below", "-2"],
                         capsys)
    assert status == 0 and "below" not in err
    status, _, err = run(["report", "-c", month, "--period", "2026-11", "--fail-below",
                          "three"], capsys)
    assert status == 2 and "expected a ratio, a decimal number (e.g. 3)" in err


def test_one_tenant(month: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["report", "-c", month, "--period", "2026-11", "--tenant", "globex",
                            "--format", "json"], capsys)
    assert status == 0, err
    assert json.loads(out) == [{"tenant_id": "globex", **EXPECTED["globex"]}]
    # The churn is still the whole population's.
    assert "observed (1 of the 4 tenants" in err
    # A tenant the ledger knows, with no usage this month: a row of zeros, not an error.
    status, out, err = run(["report", "-c", month, "--period", "2026-11", "--tenant",
                            "umbrella", "--format", "json"], capsys)
    assert status == 0, err
    [row] = json.loads(out)
    assert (row["requests"], row["cost"], row["revenue"], row["margin"], row["ltv"],
            row["ltv_cac"], row["flags"]) == (0, "0", "0", None, "0", "0", ["ltv_cac_below_3"])


def test_unknown_tenant_is_one_line_and_exit_1(month: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["report", "-c", month, "--period", "2026-11", "--tenant", "nobody"],
                           capsys)
    assert (status, out) == (1, "")
    assert err == ("ai-saas: unknown tenant 'nobody': not in the configuration's tenants and "
                   "no usage of it in the ledger\n")


def test_an_empty_period_is_an_honest_empty_report(month: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["report", "-c", month, "--period", "2025-01", "--format", "json"],
                           capsys)
    assert (status, json.loads(out)) == (0, [])
    # no usage in 2024-12 either: the default churn, said
    assert "churn 0.05 a month: assumed (no tenant had usage in 2024-12" in err
    status, out, _ = run(["report", "-c", month, "--period", "2025-01"], capsys)
    assert status == 0 and out.splitlines()[0] == "report 2025-01: 0 tenants"
    assert out.splitlines()[-1] == "no usage in 2025-01."
    status, out, _ = run(["report", "-c", month, "--period", "2025-01", "--format", "csv"],
                         capsys)
    assert status == 0 and out.splitlines() == [
        "tenant_id,requests,errors,prompt_tokens,completion_tokens,cost,revenue,gross_profit,"
        "margin,saved,cache_hits,top_models,outcome_value,outcomes,cost_per_outcome,churn,"
        "ltv,cac,cac_source,ltv_cac,flags"]


def test_configured_churn_and_the_default_when_nobody_left(ledger_url: str, tmp_path: Path,
                                                           month: str,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    configured = write_config(tmp_path, ledger_url, monthlyChurn="0.1")
    status, out, err = run(["report", "-c", configured, "--period", "2026-11", "--format",
                            "json"], capsys)
    assert status == 0, err
    rows = {r["tenant_id"]: r for r in json.loads(out)}
    # globex: 0.9 / 0.1 = 9; / 1.2 = 7.5.  acme: 0.65 / 0.1 = 6.5 (CAC 1)
    assert (rows["globex"]["ltv"], rows["globex"]["ltv_cac"]) == ("9", "7.5")
    assert (rows["acme"]["ltv"], rows["acme"]["ltv_cac"], rows["acme"]["flags"]) == \
        ("6.5", "6.5", [])
    assert "# assumption: churn 0.1 a month: billing.monthlyChurn" in err
    # December: acme only, and acme had usage in November, but globex, hooli and initech
    # have none in December: 3 of 4 left.  acme's December: revenue
    # 999 x 0.00001 + 999 x 0.00003 = 0.03996, cost 9: gross profit -8.96004;
    # LTV -8.96004 / 0.75 = -11.94672
    status, out, err = run(["report", "-c", month, "--period", "2026-12", "--format",
                            "json"], capsys)
    [row] = json.loads(out)
    assert (row["churn"], row["ltv"], row["flags"]) == ("0.75", "-11.94672",
                                                        ["ltv_cac_below_3", "negative_margin"])


def test_no_observed_churn_when_every_tenant_stayed(ledger_url: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    record(ledger_url, [e for e in OCTOBER if e.tenant_id != "umbrella"] + NOVEMBER)
    config = write_config(tmp_path, ledger_url)
    status, out, err = run(["report", "-c", config, "--period", "2026-11", "--format",
                            "json"], capsys)
    assert status == 0, err
    rows = {r["tenant_id"]: r for r in json.loads(out)}
    # The default 0.05: globex 0.9 / 0.05 = 18, / 1.2 = 15
    assert (rows["globex"]["churn"], rows["globex"]["ltv"], rows["globex"]["ltv_cac"]) == \
        ("0.05", "18", "15")
    assert ("churn 0.05 a month: assumed (all 3 tenants with usage in 2026-10 have usage in "
            "2026-11") in err


def test_an_unmigrated_ledger_is_one_line(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    status, out, err = run(["report", "-c", config, "--period", "2026-11"], capsys)
    assert (status, out) == (1, "")
    assert "run 'ai-saas billing migrate'" in err and "Traceback" not in err


def _read_terminal(primary: int, until: str, timeout_s: float = 10.0) -> str:
    """What was written to a pty's other side, read until ``until`` arrived (a pty hands
    writes over to its reader asynchronously: one read right after the writer returned
    can miss the last of them)."""
    data = b""
    deadline = time.monotonic() + timeout_s
    while until.encode() not in data and time.monotonic() < deadline:
        ready, _, _ = io_select.select([primary], [], [], 0.1)
        if ready:
            data += os.read(primary, 65536)
    return data.decode()


def test_library_report_and_a_progress_bar_only_on_a_terminal(ledger_url: str) -> None:
    # 120 tenants (over the bar's threshold of 100), one event each: cost 0.01, revenue
    # 1000 x 0.00001 = 0.01; gross profit 0 for all.
    many = [entry(f"m{i}", f"tenant{i:03d}", "pro", "model-small", "2026-11-01T00:00:00Z",
                  1000, 0, "0.01") for i in range(120)]
    record(ledger_url, many)
    config = load_config(config_dict(ledger_url))
    ledger = Ledger(ledger_url)
    primary, secondary = pty.openpty()
    try:
        with os.fdopen(secondary, "w", closefd=False) as terminal:
            report = build_report(ledger, config, "2026-11", progress=terminal)
        drawn = _read_terminal(primary, until="\033[K")
        piped = io.StringIO()
        build_report(ledger, config, "2026-11", progress=piped)
    finally:
        ledger.close()
        os.close(primary)
        os.close(secondary)
    assert len(report.tenants) == 120
    assert {r.margin for r in report.tenants} == {Decimal(0)}
    # no previous month: the default churn; LTV 0 / 0.05 = 0
    assert (report.churn, report.churn_source) == (Decimal("0.05"), "default")
    assert "120/120 tenants" in drawn and "report 2026-11 [" in drawn
    assert piped.getvalue() == ""


# ---------------------------------------------------------------- reprice

REPRICE_BEFORE: dict[str, Any] = {  # the pricing in force while the events were recorded
    "pricingRules": [{"metric": "input_tokens", "rate": "0.00001"},
                     {"metric": "output_tokens", "rate": "0.00003"}],
    "marginRules": [{"below": "0", "markup": "1"}],  # below 0: cost x 2 from the next event
}
REPRICE_AFTER: dict[str, Any] = {  # today's pricing
    "pricingRules": [{"metric": "input_tokens", "rate": "0.00001"},
                     {"metric": "output_tokens", "rate": "0.00006"}],
    "minimumPerRequest": "0.1",
    "marginRules": [{"below": "0", "markup": "0.5"}],
}


@pytest.fixture
def repriced_month(ledger_url: str, tmp_path: Path) -> str:
    """Events recorded under REPRICE_BEFORE; the path of a config of REPRICE_AFTER."""
    # r1  10000 x 0.00001 + 5000 x 0.00003 = 0.25
    # h1  1000 x 0.00001 + 1000 x 0.00003 = 0.04 against a cost of 0.5: hooli is flagged
    record(ledger_url, [
        entry("r1", "acme", "free", "model-small", "2026-11-02T00:00:00Z", 10000, 5000, "0.05"),
        entry("h1", "hooli", "pro", "model-large", "2026-11-03T00:00:00Z", 1000, 1000, "0.5"),
        entry("o1", "acme", "free", "model-small", "2026-10-02T00:00:00Z", 10000, 5000, "0.05"),
    ], **REPRICE_BEFORE)
    # h2, recorded after the flag: the switched plan, 0.5 x (1 + 1) = 1.0
    record(ledger_url, [entry("h2", "hooli", "pro", "model-large", "2026-11-04T00:00:00Z",
                              1000, 1000, "0.5")], **REPRICE_BEFORE)
    return write_config(tmp_path, ledger_url, **REPRICE_AFTER)


def revenues(ledger_url: str) -> dict[str, tuple[Decimal, int]]:
    ledger = Ledger(ledger_url)
    try:
        with ledger.reading() as conn:
            e = t.usage_events.c
            return {r.request_id: (from_picodollars(r.revenue_p), r.pricing_version)
                    for r in conn.execute(select(e.request_id, e.revenue_p,
                                                 e.pricing_version))}
    finally:
        ledger.close()


def daily_revenue(ledger_url: str) -> dict[tuple[str, str], Decimal]:
    ledger = Ledger(ledger_url)
    try:
        with ledger.reading() as conn:
            d = t.usage_daily.c
            return {(r.tenant_id, r.period): from_picodollars(r.revenue)
                    for r in conn.execute(select(d.tenant_id, d.period,
                                                 func.sum(d.revenue_p).label("revenue"))
                                          .group_by(d.tenant_id, d.period))}
    finally:
        ledger.close()


def log_entries(ledger_url: str) -> list[tuple[str, str]]:
    ledger = Ledger(ledger_url)
    try:
        with ledger.reading() as conn:
            return [(r.action, r.detail) for r in conn.execute(
                select(t.billing_log.c.action, t.billing_log.c.detail)
                .order_by(t.billing_log.c.id))]
    finally:
        ledger.close()


def test_reprice_changes_revenue_as_hand_calculated(ledger_url: str, repriced_month: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    before = revenues(ledger_url)
    assert {rid: rev for rid, (rev, _) in before.items()} == {
        "r1": Decimal("0.25"), "h1": Decimal("0.04"), "h2": Decimal("1"), "o1": Decimal("0.25")}
    versions_before = len(log_entries(ledger_url))

    status, out, err = run(["billing", "reprice", "-c", repriced_month, "--period", "2026-11"],
                           capsys)
    assert status == 0, err
    after = revenues(ledger_url)
    # r1  10000 x 0.00001 + 5000 x 0.00006 = 0.1 + 0.3 = 0.4 (over the minimum 0.1)
    # h1  recorded before the flag, base plan: 0.01 + 0.06 = 0.07, raised to the minimum 0.1
    # h2  recorded after it, the switched plan: 0.5 x (1 + 0.5) = 0.75
    # o1  October: untouched
    assert {rid: rev for rid, (rev, _) in after.items()} == {
        "r1": Decimal("0.4"), "h1": Decimal("0.1"), "h2": Decimal("0.75"), "o1": Decimal("0.25")}
    assert after["o1"][1] == before["o1"][1]
    assert after["r1"][1] == after["h1"][1] != before["r1"][1]  # the new base plan's version
    assert after["h2"][1] not in (after["r1"][1], before["h2"][1])  # the new switched plan's
    # usage_daily rebuilt from the rows: acme 0.4, hooli 0.1 + 0.75 = 0.85
    assert daily_revenue(ledger_url) == {
        ("acme", "2026-11"): Decimal("0.4"), ("hooli", "2026-11"): Decimal("0.85"),
        ("acme", "2026-10"): Decimal("0.25")}
    lines = out.splitlines()
    assert lines[0].startswith("reprice 2026-11: 3 events, 3 changed; pricing base v")
    assert lines[2].split() == ["acme", "1", "0.25", "0.4", "0.15"]
    assert lines[3].split() == ["hooli", "2", "1.04", "0.85", "-0.19"]  # 0.04 + 1 -> 0.85
    assert lines[4].split() == ["total", "3", "1.29", "1.25", "-0.04"]
    # Logged, once.
    entries = log_entries(ledger_url)
    assert len(entries) == versions_before + 1
    action, detail = entries[-1]
    logged = json.loads(detail)
    assert action == "reprice"
    assert (logged["period"], logged["events"], logged["changed"], logged["before"],
            logged["after"]) == ("2026-11", 3, 3, "1.29", "1.25")
    assert logged["tenants"] == {"acme": ["0.25", "0.4"], "hooli": ["1.04", "0.85"]}
    assert logged["pricing_versions"]["base"] == after["r1"][1]
    assert logged["pricing_versions"]["billing.marginRules[0]"] == after["h2"][1]
    # The report reads the new revenue: hooli 0.85 - 1.0 = -0.15 gross profit
    status, out, _ = run(["report", "-c", repriced_month, "--period", "2026-11", "--format",
                          "json", "--tenant", "hooli"], capsys)
    assert json.loads(out)[0]["gross_profit"] == "-0.15"
    # A second reprice with the same pricing changes nothing.
    status, out, _ = run(["billing", "reprice", "-c", repriced_month, "--period", "2026-11"],
                         capsys)
    assert status == 0 and "3 events, 0 changed" in out
    assert revenues(ledger_url) == after


def test_reprice_dry_run_writes_nothing(ledger_url: str, repriced_month: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    def snapshot() -> dict[str, Any]:
        ledger = Ledger(ledger_url)
        try:
            with ledger.reading() as conn:
                return {table.name: sorted(tuple(r) for r in conn.execute(select(table)))
                        for table in (t.usage_events, t.usage_daily, t.pricing_versions,
                                      t.tenant_flags, t.billing_log)}
        finally:
            ledger.close()

    before = snapshot()
    status, out, err = run(["billing", "reprice", "-c", repriced_month, "--period", "2026-11",
                            "--dry-run"], capsys)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("reprice 2026-11 (dry run: nothing written): 3 events, 3 would "
                               "change; pricing base vnew, billing.marginRules[0] vnew")
    assert lines[-1].split() == ["total", "3", "1.29", "1.25", "-0.04"]
    assert snapshot() == before


def test_reprice_of_an_empty_period(ledger_url: str, repriced_month: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["billing", "reprice", "-c", repriced_month, "--period", "2025-01"],
                         capsys)
    assert status == 0
    assert out.splitlines()[-1] == "no events in 2025-01."


# ---------------------------------------------------------------- rates.py's plans

def one(prompt: int, completion: int, cost: str, tier: str = "pro") -> Event:
    return entry("x", "acme", tier, "model-small", "2026-11-01T00:00:00Z", prompt, completion,
                 cost)




def priced(plan: Plan, event: Event) -> Decimal:
    return from_picodollars(plan.price(event, plan.rates_for(event.tier)))


def test_a_tier_rule_overrides_the_tierless_one() -> None:
    plan = Plan.of((PricingRule("input_tokens", Decimal("0.00001")),
                    PricingRule("input_tokens", Decimal("0.000004"), "pro"),
                    PricingRule("output_tokens", Decimal("0.00002"))), None, None)
    # pro: 1000 x 0.000004 + 100 x 0.00002 = 0.004 + 0.002 = 0.006
    assert priced(plan, one(1000, 100, "1", tier="pro")) == Decimal("0.006")
    # free: 1000 x 0.00001 + 100 x 0.00002 = 0.01 + 0.002 = 0.012
    assert priced(plan, one(1000, 100, "1", tier="free")) == Decimal("0.012")


def test_markup_is_cost_plus_rounded_up_to_a_picodollar() -> None:
    half = Plan.of((), Decimal("0.5"), None)
    # 0.000000000001 x 1.5 = 1.5 picodollars -> 2
    assert priced(half, one(1, 1, "0.000000000001")) == Decimal("0.000000000002")
    # 0.25 x 1.5 = 0.375 exactly
    assert priced(half, one(1, 1, "0.25")) == Decimal("0.375")
    third = Plan.of((), Decimal("0.333333333333"), None)
    # 3 picodollars x 1.333333333333 = 3.999999999999 picodollars -> 4
    assert priced(third, one(1, 1, "0.000000000003")) == Decimal("0.000000000004")
    # Rules, when some apply, win over the markup: 10 x 0.001 = 0.01
    both = Plan.of((PricingRule("requests", Decimal("0.01")),), Decimal("10"), None)
    assert priced(both, one(10, 10, "5")) == Decimal("0.01")


def test_the_minimum_per_request() -> None:
    plan = Plan.of((PricingRule("input_tokens", Decimal("0.00001")),), None, Decimal("0.001"))
    assert priced(plan, one(1, 0, "0")) == Decimal("0.001")  # 0.00001 -> the minimum
    assert priced(plan, one(1000, 0, "0")) == Decimal("0.01")  # over it: 1000 x 0.00001
    with_markup = Plan.of((), Decimal("1"), Decimal("0.001"))
    assert priced(with_markup, one(1, 1, "0")) == Decimal("0.001")  # 0 x 2 -> the minimum
    assert priced(Plan.of((), None, None), one(1000, 1000, "3")) == Decimal(0)  # nothing set


def test_reprice_of_an_unmigrated_ledger_is_one_line(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    status, out, err = run(["billing", "reprice", "-c", config, "--period", "2026-11"], capsys)
    assert (status, out) == (1, "")
    assert "run 'ai-saas billing migrate'" in err and "Traceback" not in err
