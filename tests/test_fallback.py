"""Fallback chains and circuit breakers end to end (issue 9 items 2, 3 and 7): real
processes, one Redis, and a provider stand-in over loopback HTTP that fails every call to
one model until it recovers.

The two-process test drives two worker processes (each a sync Gateway calling
``ctx.complete`` through the provider layer) from this one, step by step, over their
stdin and stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from conftest import ROOT
from faults import wait_until
from provider_standins import StandIn

from ai_saas_middleware import Gateway
from ai_saas_middleware.errors import NoHealthyModel


@pytest.fixture
def provider_config(make_config: Any, standin: StandIn, monkeypatch: pytest.MonkeyPatch
                    ) -> dict[str, Any]:
    monkeypatch.setenv("STANDIN_KEY", "sk-standin")
    config = make_config()
    config["providers"] = [
        {"id": "openai", "kind": "openai", "baseUrl": standin.base_url,
         "apiKeyEnv": "STANDIN_KEY", "readTimeout": "5s"},
        {"id": "anthropic", "kind": "anthropic", "baseUrl": standin.base_url,
         "apiKeyEnv": "STANDIN_KEY", "readTimeout": "5s"},
    ]
    config["routing"] = {"fallbackChain": ["model-small", "model-large", "model-medium"],
                         "circuitBreaker": {"errorThreshold": 3, "resetTimeout": "2s"}}
    return config


MESSAGES = [{"role": "user", "content": "hello there"}]

WORKER = textwrap.dedent("""
    import json, sys, time
    from ai_saas_middleware import Gateway
    from ai_saas_middleware.errors import NoHealthyModel
    gateway = Gateway(json.loads(sys.argv[1]))
    board = gateway.breakers
    messages = [{"role": "user", "content": "hello there"}]
    for line in sys.stdin:
        command = json.loads(line)
        out = []
        if command["op"] == "run":
            for _ in range(command["n"]):
                try:
                    with gateway.request(tenant_id="initech", endpoint="/ai/chat",
                                         body={"messages": messages, "max_tokens": 20}) as ctx:
                        ctx.complete(messages)
                        out.append([ctx.answered_by.id, ctx.fallback_from])
                except NoHealthyModel as exc:
                    out.append(["none", exc.decision.error_code])
                time.sleep(command.get("gap", 0))
        elif command["op"] == "drain":  # the failures reported are recorded
            deadline = time.monotonic() + 10
            while board._reports and time.monotonic() < deadline:
                time.sleep(0.005)
            out = sorted(board._open)
        elif command["op"] == "open":
            board.any_open  # (starts the watch, once)
            out = sorted(board._open)
        print(json.dumps(out), flush=True)
""")


class Worker:
    def __init__(self, config: dict[str, Any]):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(config)],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def ask(self, **command: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            stderr = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"worker died: {stderr}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def test_a_failing_models_breaker_opens_in_every_process_then_one_probe_closes_it(
        provider_config: dict[str, Any], standin: StandIn, events: Any) -> None:
    standin.failing.add("model-small")
    a, b = Worker(provider_config), Worker(provider_config)
    try:
        assert a.ask(op="open") == [] and b.ask(op="open") == []
        before = standin.calls("model-small")
        # Process a: model-small (the cheapest) fails; each request falls back along the
        # chain to model-large, and each failure is counted.
        answers = []
        for _ in range(3):
            answers += a.ask(op="run", n=1)
            a.ask(op="drain")
        assert answers == [["model-large", "model-small"]] * 3
        assert standin.calls("model-small") - before == 3  # = errorThreshold
        # Open in both processes: no more calls to model-small, from either.
        wait_until(lambda: b.ask(op="open") == ["model-small"], what="b to see it open")
        assert a.ask(op="open") == ["model-small"]
        assert b.ask(op="run", n=5) == [["model-large", None]] * 5
        assert a.ask(op="run", n=5) == [["model-large", None]] * 5
        assert standin.calls("model-small") - before == 3

        # After resetTimeout (2 s), still failing: exactly one probe, from one process,
        # while both keep asking; it fails and the breaker opens again.
        time.sleep(2.1)
        probe_deadline = time.monotonic() + 5
        while standin.calls("model-small") - before == 3 and time.monotonic() < probe_deadline:
            a.ask(op="run", n=1, gap=0.01)
            b.ask(op="run", n=1, gap=0.01)
        assert standin.calls("model-small") - before == 4  # the probe
        a.ask(op="drain")
        b.ask(op="drain")
        a.ask(op="run", n=5)
        b.ask(op="run", n=5)
        assert standin.calls("model-small") - before == 4  # open again: no second probe

        # The model recovers: after resetTimeout, one probe succeeds and closes the breaker
        # everywhere; model-small (the cheapest) answers again in both processes.
        # (Only a asks here: once b's view is closed it may call model-small itself, before
        # a's view is, and the count below would race with that.)
        standin.failing.discard("model-small")
        time.sleep(2.1)
        closed_deadline = time.monotonic() + 5
        while a.ask(op="open") and time.monotonic() < closed_deadline:
            a.ask(op="run", n=1, gap=0.01)
        assert standin.calls("model-small") - before == 5  # one probe, and it closed it
        wait_until(lambda: b.ask(op="open") == [], what="b to see it closed")
        assert a.ask(op="run", n=2) == [["model-small", None]] * 2
        assert b.ask(op="run", n=2) == [["model-small", None]] * 2
    finally:
        standin.failing.discard("model-small")
        a.close()
        b.close()
    fallbacks = [e for e in events() if e["fallback_from"]]
    assert len(fallbacks) == 4  # the three failures, and the probe that failed
    assert {(e["model_id"], e["fallback_from"]) for e in fallbacks} == {
        ("model-large", "model-small")}


def test_every_model_failing_is_no_healthy_model_then_admission_answers_503_itself(
        provider_config: dict[str, Any], standin: StandIn, events: Any) -> None:
    standin.failing.update({"model-small", "model-medium", "model-large"})
    gateway = Gateway(provider_config)
    try:
        for _ in range(3):  # three requests, each trying all three models: all open
            with pytest.raises(NoHealthyModel) as raised:
                with gateway.request(tenant_id="globex", endpoint="/ai/chat",
                                     body={"messages": MESSAGES, "max_tokens": 20}) as ctx:
                    ctx.complete(MESSAGES)
            assert raised.value.decision.status == 503
        wait_until(lambda: len(gateway.breakers._open) == 3 and not gateway.breakers._reports)
        calls = sum(standin.calls(m) for m in ("model-small", "model-medium", "model-large"))
        decision = gateway.admit(*gateway._job_info(
            "globex", "/ai/chat", {"messages": MESSAGES, "max_tokens": 20}, None))
        assert (decision.status, decision.error_code) == (503, "no_healthy_model")
        assert 1 <= (decision.retry_after_s or 0) <= 2  # when the first may be probed
        assert sum(standin.calls(m) for m in ("model-small", "model-medium",
                                               "model-large")) == calls  # none was called
    finally:
        standin.failing.difference_update({"model-small", "model-medium", "model-large"})
        gateway.close()
    assert [e["status"] for e in events()] == ["500"] * 3  # jobs that failed, billed nothing
    assert {e["prompt_tokens"] for e in events()} == {"0"}


def test_the_default_response_answers_when_no_model_can(
        provider_config: dict[str, Any], standin: StandIn) -> None:
    provider_config["routing"]["defaultResponse"] = "Busy, try again soon."
    standin.failing.update({"model-small", "model-medium", "model-large"})
    gateway = Gateway(provider_config)
    try:
        with pytest.raises(NoHealthyModel) as raised:
            with gateway.request(tenant_id="globex", endpoint="/ai/chat",
                                 body={"messages": MESSAGES, "max_tokens": 20}) as ctx:
                ctx.complete(MESSAGES)
        decision = raised.value.decision
        assert decision.status == 200
        assert ("x-ai-routing", "fallback") in decision.headers
        body = json.loads(decision.body)
        assert body["choices"][0]["message"]["content"] == "Busy, try again soon."
    finally:
        standin.failing.difference_update({"model-small", "model-medium", "model-large"})
        gateway.close()


def test_a_client_error_is_raised_at_once_with_no_fallback(
        provider_config: dict[str, Any], standin: StandIn) -> None:
    gateway = Gateway(provider_config)
    tried: list[str] = []

    def call(model: Any) -> str:
        tried.append(model.id)
        raise ValueError("the app's own bug")

    try:
        with pytest.raises(ValueError):
            with gateway.request(tenant_id="globex", endpoint="/ai/chat",
                                 body={"messages": MESSAGES, "max_tokens": 20}) as ctx:
                ctx.execute(call)
        assert tried == ["model-small"]
        assert not gateway.breakers._reports and gateway.breakers._open == {}
    finally:
        gateway.close()


STREAM_MODELS = [
    {"id": "status-503", "provider": "openai", "costPerInputToken": "0.000001",
     "costPerOutputToken": "0.000002", "maxTokens": 16000, "qualityScore": 0.5,
     "latencyP99Ms": 500},
    {"id": "cut-stream", "provider": "openai", "costPerInputToken": "0.000001",
     "costPerOutputToken": "0.000002", "maxTokens": 16000, "qualityScore": 0.5,
     "latencyP99Ms": 500},
    {"id": "good", "provider": "openai", "costPerInputToken": "0.000003",
     "costPerOutputToken": "0.000004", "maxTokens": 16000, "qualityScore": 0.5,
     "latencyP99Ms": 500},
]


def stream_config(provider_config: dict[str, Any], first: str) -> dict[str, Any]:
    config = dict(provider_config)
    config["models"] = STREAM_MODELS
    config["tenant"] = {"tiers": [{"name": "pro", "monthlyQuota": 100000, "rateLimit": 100,
                                   "allowedModels": [first, "good"]},
                                  {"name": "free", "monthlyQuota": 1000, "rateLimit": 10,
                                   "allowedModels": ["good"]},
                                  {"name": "enterprise", "monthlyQuota": 1000,
                                   "rateLimit": 10, "allowedModels": ["good"]}]}
    config["routing"] = {"fallbackChain": [first, "good"]}
    return config


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_a_stream_failing_before_its_first_byte_falls_back(
        asynchronous: bool, provider_config: dict[str, Any], events: Any) -> None:
    from ai_saas_middleware import AsyncGateway
    config = stream_config(provider_config, "status-503")
    body = {"messages": MESSAGES, "max_tokens": 20}
    if asynchronous:
        agateway = AsyncGateway(config)
        try:
            async with agateway.request(tenant_id="globex", body=body) as actx:
                text = "".join([d async for d in actx.astream(MESSAGES)])
        finally:
            await agateway.close()
    else:
        gateway = Gateway(config)
        try:
            with gateway.request(tenant_id="globex", body=body) as ctx:
                text = "".join(ctx.stream(MESSAGES))
        finally:
            gateway.close()
    assert text == "Hello from good"
    (event,) = events()
    assert (event["model_id"], event["fallback_from"], event["truncated"]) == (
        "good", "status-503", "false")
    assert event["usage_source"] == "provider" and event["completion_tokens"] == "4"


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_a_stream_cut_after_its_first_byte_is_billed_for_what_came_and_truncated(
        asynchronous: bool, provider_config: dict[str, Any], standin: StandIn,
        events: Any) -> None:
    from ai_saas_middleware import AsyncGateway
    config = stream_config(provider_config, "cut-stream")
    body = {"messages": MESSAGES, "max_tokens": 20}
    good_before = standin.calls("good")
    if asynchronous:
        agateway = AsyncGateway(config)
        try:
            async with agateway.request(tenant_id="globex", body=body) as actx:
                deltas = [d async for d in actx.astream(MESSAGES)]
        finally:
            await agateway.close()
    else:
        gateway = Gateway(config)
        try:
            with gateway.request(tenant_id="globex", body=body) as ctx:
                deltas = list(ctx.stream(MESSAGES))
        finally:
            gateway.close()
    assert deltas == ["Hello", " from"]  # what came before the cut, and nothing after
    assert standin.calls("good") == good_before  # no fallback once bytes reached the client
    (event,) = events()
    assert (event["model_id"], event["truncated"], event["fallback_from"]) == (
        "cut-stream", "true", "")
    assert int(event["completion_tokens"]) >= 1  # billed for what was produced
    assert event["usage_source"] == "estimate"
