"""What ``ai-saas demo`` printed, checked against what the test measures itself in Redis
and against README.md's copy of the output; shared by the three demos' tests.

The demo prints the same report in every run and on every framework, except the ports,
the stored tenant's key and the elapsed time: ``check_demo_run`` returns the part that
must be equal between runs, after checking each figure of the per-tenant table against
the run's own usage stream, quota counters and rate-limit windows.
"""

from __future__ import annotations

import re
from collections import Counter
from decimal import Decimal
from typing import Any

from conftest import ROOT

from ai_saas_middleware.demo import HANG_UP_AFTER_CHUNKS
from ai_saas_middleware.estimate import estimate_tokens
from ai_saas_middleware.pricing import format_usd
from ai_saas_middleware.store.keys import KeySchema
from demo_projects import provider

README = ROOT / "README.md"
README_MARKER = "<!-- demo-output -->"
TABLE_START, TABLE_END = "Usage read back", "total cost:"
ROUND_TRIPS = "Redis round trips by step"

# The replies the demo's fixed traffic gets, per tenant: 14 free-co requests against its
# 10 req/min, 12 + 1 (the stream hung up on) for pro-co, 8 + 2 premium for big-co, 6 for
# startup-co (stored in Redis), an unknown key, 5 pages.
PLAN_STATUSES = {"(non-AI page)": {200: 5}, "(unknown key)": {401: 1}, "big-co": {200: 10},
                 "free-co": {200: 10, 429: 4}, "pro-co": {200: 13}, "startup-co": {200: 6}}


def readme_demo_output() -> str:
    """The demo's output as README.md shows it: the ``text`` block after the marker."""
    text = README.read_text()
    start = text.index("```text\n", text.index(README_MARKER)) + len("```text\n")
    return text[start:text.index("```", start)].rstrip("\n")


def _section(text: str, start: str, end: str | None = None) -> str:
    """From the line that starts with ``start`` to the one with ``end`` (or the end)."""
    first = text.index(start)
    last = len(text) if end is None else text.index("\n", text.index(end, first))
    return text[first:last].rstrip("\n")


def _round_trip_rows(text: str) -> dict[str, tuple[Counter[int], int]]:
    """The round-trips table: step number -> (replies by status, EVALSHA)."""
    rows = {}
    for line in _section(text, ROUND_TRIPS).splitlines():
        match = re.match(r"^(\d)\. .+?\s{2,}((?:\d{3} x\d+(?:, )?)+)\s{2,}(\d+)$", line)
        if match:
            replies = Counter({int(s): int(n) for s, n in re.findall(r"(\d{3}) x(\d+)",
                                                                    match[2])})
            rows[match[1]] = (replies, int(match[3]))
    return rows


def check_demo_run(text: str, framework: str, rclient: Any = None, prefix: str = "",
                   *, private_redis: bool = False) -> str:
    """Check one run's report and return the part every run prints alike.

    With ``rclient`` and ``prefix`` (a run on the test Redis), each figure of the
    per-tenant table is checked against what Redis holds under that prefix. With
    ``private_redis`` (a run that started its own server, so its EVALSHA counts are the
    demo's alone), the round trips are checked against the hot path's budget and
    returned too; on the shared test Redis they are left out (another client's calls
    would count in them).
    """
    assert f"demo app ({framework})" in text, text
    statuses = {m[1]: {int(code): int(n) for code, n in re.findall(r"(\d{3}) x(\d+)", m[2])}
                for m in re.finditer(r"^  (\S.*?)\s{2,}(\d{3} x\d+.*)$", text, re.M)}
    assert statuses == PLAN_STATUSES

    # The stream a client hung up on: the provider stand-in paused after HANG_UP_AFTER_CHUNKS
    # words, so the client read exactly these and the app billed their characters.
    words = provider.reply_words({"model": "model-small", "max_tokens": 40})
    read = " ".join(words[:HANG_UP_AFTER_CHUNKS])
    hang_up = re.search(r"read (\d+) chunks of a stream \((\d+) characters of text\) and hung "
                        r"up:\n  billed (\d+) prompt \+ (\d+) completion tokens \(usage_source="
                        r"(\w+), client_disconnected=(\w+)\)\.", text)
    assert hang_up, text
    assert (int(hang_up[1]), int(hang_up[2])) == (HANG_UP_AFTER_CHUNKS, len(read))
    assert int(hang_up[4]) == estimate_tokens(len(read))
    assert (hang_up[5], hang_up[6]) == ("estimate", "true")

    table = _section(text, TABLE_START, TABLE_END)
    # The same table on every framework and in every run: README.md's.
    assert table == _section(readme_demo_output(), TABLE_START, TABLE_END)
    if rclient is not None:
        _check_table_against_redis(table, statuses, rclient, prefix, hang_up)
    if not private_redis:
        return _without_elapsed(_section(text, "Sent ", TABLE_END))

    steps = _round_trip_rows(text)
    assert set(steps) == {"1", "2", "3", "4"}, text
    for step, (replies, evalsha) in steps.items():
        # 2 per admitted AI request, 1 per 429, none for the 401 and the pages (step 4),
        # 1 more for the stored tenant's first request (step 1).
        budget = 0 if step == "4" else 2 * replies[200] + replies[429] + (step == "1")
        assert evalsha == budget, (step, text)
    assert "Each step's count is the budget's." in text
    assert _section(text, TABLE_START) == readme_demo_output()
    return _without_elapsed(_section(text, "Sent "))


def _without_elapsed(text: str) -> str:
    """The report without its one figure that differs from run to run, by nature."""
    return re.sub(r"^Sent (\d+) requests in [\d.]+s\.", r"Sent \1 requests.", text)


def _check_table_against_redis(table: str, statuses: dict[str, dict[int, int]],
                               rclient: Any, prefix: str, hang_up: re.Match[str]) -> None:
    """Each row of the printed table is what the test reads under ``prefix``: events in
    the usage stream, their tokens and exact cost, the quota counters those tokens were
    billed to, and the rate-limit window's admissions."""
    events = []
    for stream in rclient.scan_iter(match=f"{prefix}:*:usage", count=1000):
        events += [fields for _id, fields in rclient.xrange(stream)]
    schema = KeySchema(prefix, 16)
    measured: dict[str, list[str]] = {}
    total = Decimal(0)
    for tenant in sorted({e["tenant_id"] for e in events}):
        mine = [e for e in events if e["tenant_id"] == tenant]
        tokens = sum(int(e["prompt_tokens"]) + int(e["completion_tokens"]) for e in mine)
        cost = sum((Decimal(e["cost"]) for e in mine), Decimal(0))
        total += cost
        keys = schema.tenant(tenant)
        billed = sum(int(rclient.get(keys.quota(month)) or 0)
                     for month in {e["ts"][:7] for e in mine})
        assert billed == tokens, tenant  # the quota counters hold what the events say
        assert rclient.zcard(keys.rate_limit) == len(mine), tenant  # admissions this minute
        models = Counter(e["model_id"] for e in mine)
        measured[tenant] = [tenant, mine[0]["tier"], str(len(mine)),
                            str(statuses[tenant].get(429, 0)), f"{tokens:,}", format_usd(cost),
                            ", ".join(f"{m} x{n}" for m, n in sorted(models.items()))]
    printed = {row[0]: row for row in (re.split(r"\s{2,}", line.strip())
                                       for line in table.splitlines()[3:-1])}
    assert printed == measured
    assert table.splitlines()[-1] == f"total cost: ${format_usd(total)}"

    [hung] = [e for e in events if e["client_disconnected"] == "true"]
    assert hung["tenant_id"] == "pro-co" and hung["usage_source"] == "estimate"
    assert (hung["prompt_tokens"], hung["completion_tokens"]) == (hang_up[3], hang_up[4])
