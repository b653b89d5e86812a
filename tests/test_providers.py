"""The provider layer against real HTTP servers on loopback (tests/provider_standins.py).

Every scenario runs for both APIs (OpenAI-compatible, Anthropic) and both twins (sync
over urllib3, async over aiohttp): whole replies and streams with the provider's usage,
5xx, 429, 400, malformed replies, a server that never answers, a slow stream, a stream
cut mid-answer, a refused connection; then ``is_failure`` over those and over the
exceptions an app's own ``call(model)`` raises; the API key reaches the server and
nowhere else; the ``providers:`` configuration.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from provider_standins import DELTAS, StandIn

from ai_saas_middleware import load_config
from ai_saas_middleware.config import ProviderConfig
from ai_saas_middleware.errors import ConfigError
from ai_saas_middleware.providers import (
    MalformedReply,
    ProviderConnectionError,
    ProviderError,
    ProviderHTTPError,
    ProviderNotConfigured,
    ProviderTimeout,
    Reply,
    StreamCut,
    build_provider,
    build_providers,
    is_failure,
)
from ai_saas_middleware.providers.http import HTTPProvider

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("openai", "anthropic")
MODES = ("sync", "async")
MESSAGES = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Say hello to me"}]
PROMPT_WORDS = 6  # what the stand-in counts as the prompt tokens of MESSAGES


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    key = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("STANDIN_API_KEY", key)
    return key


@pytest.fixture
def make_provider(standin: StandIn, api_key: str) -> Iterator[Callable[..., HTTPProvider]]:
    made: list[HTTPProvider] = []

    def make(kind: str, base_url: str | None = None, read_timeout_s: float = 5.0
             ) -> HTTPProvider:
        provider = build_provider(ProviderConfig(
            id=f"standin-{kind}", kind=kind, base_url=base_url or standin.base_url,
            api_key_env="STANDIN_API_KEY", connect_timeout_s=2.0,
            read_timeout_s=read_timeout_s))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


def complete(provider: HTTPProvider, mode: str, model: str, **params: Any) -> Reply:
    """A whole reply through the sync or the async twin (the async one on its own loop,
    closed after, as an app's shutdown would)."""
    if mode == "sync":
        return provider.complete(model, MESSAGES, max_tokens=32, **params)

    async def run() -> Reply:
        try:
            return await provider.acomplete(model, MESSAGES, max_tokens=32, **params)
        finally:
            await provider.aclose()

    return asyncio.run(run())


class Streamed:
    """What a caller saw of a stream: the deltas, the stream object, the error."""

    def __init__(self) -> None:
        self.deltas: list[str] = []
        self.stream: Any = None
        self.error: ProviderError | None = None


def stream(provider: HTTPProvider, mode: str, model: str) -> Streamed:
    seen = Streamed()
    if mode == "sync":
        seen.stream = provider.stream(model, MESSAGES, max_tokens=32)
        try:
            with seen.stream:
                for delta in seen.stream:
                    seen.deltas.append(delta)
        except ProviderError as exc:
            seen.error = exc
        return seen

    async def run() -> None:
        seen.stream = provider.astream(model, MESSAGES, max_tokens=32)
        try:
            async with seen.stream:
                async for delta in seen.stream:
                    seen.deltas.append(delta)
        except ProviderError as exc:
            seen.error = exc
        finally:
            await provider.aclose()

    asyncio.run(run())
    return seen


def expected_text(model: str) -> str:
    return "".join(DELTAS).format(model=model)


# --------------------------------------------------------------------------- whole replies


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_whole_reply_carries_the_providers_usage(make_provider: Callable[..., HTTPProvider],
                                                 standin: StandIn, kind: str, mode: str,
                                                 api_key: str) -> None:
    reply = complete(make_provider(kind), mode, "model-a", temperature=0)
    assert reply.text == expected_text("model-a")
    assert (reply.prompt_tokens, reply.completion_tokens) == (PROMPT_WORDS, len(DELTAS))
    assert reply.model == "model-a"
    assert reply.finish_reason == ("stop" if kind == "openai" else "end_turn")
    sent = standin.last()
    assert sent.body["max_tokens"] == 32 and sent.body["temperature"] == 0
    if kind == "openai":
        assert sent.path == "/chat/completions"
        assert sent.headers["authorization"] == f"Bearer {api_key}"
        assert sent.body["messages"] == MESSAGES
    else:
        assert sent.path == "/v1/messages"
        assert sent.headers["x-api-key"] == api_key
        assert sent.headers["anthropic-version"] == "2023-06-01"
        # The OpenAI-style system message became Anthropic's system field.
        assert sent.body["system"] == "Answer briefly."
        assert sent.body["messages"] == [MESSAGES[1]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("status", "failure"), [(500, True), (503, True), (429, True),
                                                  (400, False)])
def test_error_statuses(make_provider: Callable[..., HTTPProvider], kind: str, mode: str,
                        status: int, failure: bool) -> None:
    with pytest.raises(ProviderHTTPError) as caught:
        complete(make_provider(kind), mode, f"status-{status}")
    assert caught.value.status == status
    assert caught.value.failure is failure and is_failure(caught.value) is failure
    assert "boom" in caught.value.message  # the provider's own message is kept
    assert caught.value.retry_after_s == (7.0 if status == 429 else None)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_malformed_reply(make_provider: Callable[..., HTTPProvider], kind: str,
                         mode: str) -> None:
    with pytest.raises(MalformedReply) as caught:
        complete(make_provider(kind), mode, "malformed")
    assert is_failure(caught.value)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_a_server_that_never_answers_times_out(make_provider: Callable[..., HTTPProvider],
                                               kind: str, mode: str) -> None:
    with pytest.raises(ProviderTimeout) as caught:
        complete(make_provider(kind, read_timeout_s=0.3), mode, "hang")
    assert "0.3s" in caught.value.message  # bounded by the configured readTimeout
    assert is_failure(caught.value)


@pytest.fixture
def refused_url() -> Iterator[str]:
    # A bound socket that does not listen: connecting to it is refused, and no other
    # process can take the port while the test runs.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_connection_refused(make_provider: Callable[..., HTTPProvider], refused_url: str,
                            kind: str, mode: str) -> None:
    provider = make_provider(kind, base_url=refused_url)
    with pytest.raises(ProviderConnectionError) as caught:
        complete(provider, mode, "model-a")
    assert is_failure(caught.value)
    seen = stream(provider, mode, "model-a")
    assert isinstance(seen.error, ProviderConnectionError) and not seen.stream.started


# --------------------------------------------------------------------------- streams


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_stream_delivers_text_and_the_providers_usage(
        make_provider: Callable[..., HTTPProvider], standin: StandIn, kind: str,
        mode: str) -> None:
    seen = stream(make_provider(kind), mode, "model-a")
    assert seen.error is None
    assert seen.deltas == [d.format(model="model-a") for d in DELTAS]
    s = seen.stream
    assert s.done and s.started and s.text == expected_text("model-a")
    assert (s.prompt_tokens, s.completion_tokens) == (PROMPT_WORDS, len(DELTAS))
    reply = s.reply()
    assert reply.text == expected_text("model-a") and reply.completion_tokens == len(DELTAS)
    sent = standin.last().body
    assert sent["stream"] is True
    if kind == "openai":  # usage is asked for, or OpenAI sends none in a stream
        assert sent["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_slow_stream_is_delivered_whole(make_provider: Callable[..., HTTPProvider],
                                        kind: str, mode: str) -> None:
    # The chunks come SLOW_GAP_S (0.15 s) apart, 1 s to 1.4 s in all: longer than the read
    # timeout, which bounds each wait for bytes, not the whole answer.
    seen = stream(make_provider(kind, read_timeout_s=0.9), mode, "slow-stream")
    assert seen.error is None
    assert "".join(seen.deltas) == expected_text("slow-stream")
    assert len(seen.deltas) == len(DELTAS) and seen.stream.completion_tokens == len(DELTAS)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_stream_cut_mid_answer(make_provider: Callable[..., HTTPProvider], kind: str,
                               mode: str) -> None:
    seen = stream(make_provider(kind), mode, "cut-stream")
    assert isinstance(seen.error, StreamCut) and is_failure(seen.error)
    assert seen.stream.started and seen.error.started  # bytes reached the caller
    assert seen.stream.text == seen.error.text == "Hello from"
    assert seen.deltas == ["Hello", " from"] and not seen.stream.done


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [503, 429, 400])
def test_stream_refused_before_the_first_byte(make_provider: Callable[..., HTTPProvider],
                                              kind: str, mode: str, status: int) -> None:
    seen = stream(make_provider(kind), mode, f"status-{status}")
    assert isinstance(seen.error, ProviderHTTPError) and seen.error.status == status
    assert not seen.stream.started and seen.stream.text == ""  # safe to fall back
    assert is_failure(seen.error) is (status != 400)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_stream_that_never_answers_times_out(make_provider: Callable[..., HTTPProvider],
                                             kind: str, mode: str) -> None:
    seen = stream(make_provider(kind, read_timeout_s=0.3), mode, "hang")
    assert isinstance(seen.error, ProviderTimeout) and not seen.stream.started


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_stream_with_a_malformed_event(make_provider: Callable[..., HTTPProvider], kind: str,
                                       mode: str) -> None:
    seen = stream(make_provider(kind), mode, "malformed")
    # The bad event comes after the text: a cut, with the text so far.
    assert isinstance(seen.error, StreamCut) and is_failure(seen.error)
    assert seen.stream.text == expected_text("malformed")


@pytest.mark.parametrize("mode", MODES)
def test_anthropic_error_event_mid_stream(make_provider: Callable[..., HTTPProvider],
                                          mode: str) -> None:
    seen = stream(make_provider("anthropic"), mode, "stream-error")
    assert isinstance(seen.error, StreamCut) and is_failure(seen.error)
    assert "overloaded_error" in seen.error.message and seen.stream.text == "Hello"


@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_left_early_frees_its_connection(make_provider: Callable[..., HTTPProvider],
                                                  kind: str) -> None:
    provider = make_provider(kind)
    with provider.stream("slow-stream", MESSAGES, max_tokens=8) as first:
        assert next(first) == "Hello"
    # The half-read connection was not put back as is: the next calls read clean replies.
    for _ in range(3):
        assert provider.complete("model-b", MESSAGES, max_tokens=8).text == expected_text(
            "model-b")

    async def run() -> None:
        try:
            async with provider.astream("slow-stream", MESSAGES, max_tokens=8) as s:
                async for _delta in s:
                    break
            for _ in range(3):
                reply = await provider.acomplete("model-b", MESSAGES, max_tokens=8)
                assert reply.text == expected_text("model-b")
        finally:
            await provider.aclose()

    asyncio.run(run())


def test_concurrent_async_calls_share_one_pool(make_provider: Callable[..., HTTPProvider]
                                               ) -> None:
    provider = make_provider("openai")

    async def run() -> list[Reply]:
        try:
            return await asyncio.gather(*(provider.acomplete(f"m{i}", MESSAGES, max_tokens=8)
                                          for i in range(32)))
        finally:
            await provider.aclose()

    replies = asyncio.run(run())
    assert [r.text for r in replies] == [expected_text(f"m{i}") for i in range(32)]


# --------------------------------------------------------------------------- the API key


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_the_api_key_never_leaves_in_errors_or_logs(
        make_provider: Callable[..., HTTPProvider], refused_url: str, api_key: str,
        standin: StandIn, kind: str, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger: ours, urllib3's, aiohttp's
    provider = make_provider(kind)
    errors: list[BaseException] = []
    for model in ("status-401", "status-500", "status-429", "malformed", "hang",
                  "cut-stream"):
        fast = make_provider(kind, read_timeout_s=0.3) if model == "hang" else provider
        try:
            complete(fast, mode, model)
        except ProviderError as exc:
            errors.append(exc)
        seen = stream(fast, mode, model)
        if seen.error is not None:
            errors.append(seen.error)
    try:
        complete(make_provider(kind, base_url=refused_url), mode, "model-a")
    except ProviderError as exc:
        errors.append(exc)
    # The 401's body quoted the key (as OpenAI's does): it reached the server...
    assert standin.requests and any(api_key in str(r.headers) for r in standin.requests)
    assert any("[redacted]" in str(e) for e in errors)
    # ...and nothing else: not an error's message or repr, its cause, a log line, the
    # provider's repr.
    assert len(errors) >= 10
    for error in errors:
        for text in (str(error), repr(error), str(error.__cause__), repr(error.__cause__)):
            assert api_key not in text
    assert api_key not in caplog.text
    assert api_key not in repr(provider)


def test_a_missing_api_key_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    config = load_config({**_models("oa"), "providers": [
        {"id": "oa", "kind": "openai", "apiKeyEnv": "NO_SUCH_KEY_VAR"}]})
    with pytest.raises(ConfigError) as caught:
        build_providers(config)
    assert "providers[0].apiKeyEnv" in str(caught.value)
    assert "NO_SUCH_KEY_VAR is not set" in str(caught.value)


# --------------------------------------------------------------------------- is_failure


class _StatusError(Exception):
    def __init__(self, **attrs: Any) -> None:
        super().__init__("status")
        for name, value in attrs.items():
            setattr(self, name, value)


class _Response:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code


def _chained(cause: BaseException) -> BaseException:
    try:
        raise RuntimeError("the app's own wrapper") from cause
    except RuntimeError as exc:
        return exc


def _library_errors() -> list[tuple[BaseException, bool]]:
    import aiohttp
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1/chat/completions")
    cases: list[tuple[BaseException, bool]] = [
        (httpx.ConnectError("refused", request=request), True),
        (httpx.ReadTimeout("slow", request=request), True),
        (httpx.RemoteProtocolError("cut", request=request), True),
        (httpx.HTTPStatusError("503", request=request,
                               response=httpx.Response(503, request=request)), True),
        (httpx.HTTPStatusError("429", request=request,
                               response=httpx.Response(429, request=request)), True),
        (httpx.HTTPStatusError("400", request=request,
                               response=httpx.Response(400, request=request)), False),
        (aiohttp.ServerDisconnectedError(), True),
        (aiohttp.ServerTimeoutError("slow"), True),
        (aiohttp.ClientPayloadError("cut"), True),
        (aiohttp.ClientResponseError(None, (), status=502), True),  # type: ignore[arg-type]
        (aiohttp.ClientResponseError(None, (), status=404), False),  # type: ignore[arg-type]
    ]
    return cases


@pytest.mark.parametrize(("exc", "failure"), [
    (ConnectionRefusedError(), True),
    (ConnectionResetError(), True),
    (TimeoutError(), True),
    (asyncio.TimeoutError(), True),
    (_StatusError(status_code=500), True),  # the OpenAI / Anthropic SDKs' APIStatusError
    (_StatusError(status_code=529), True),  # Anthropic's "overloaded"
    (_StatusError(status=503), True),
    (_StatusError(http_status=429), True),
    (_StatusError(response=_Response(502)), True),
    (_StatusError(status_code=400), False),
    (_StatusError(status_code=401), False),
    (_StatusError(status_code=413), False),
    (_StatusError(status="failed"), False),  # not a status: says nothing
    (_StatusError(status_code=True), False),
    (ValueError("a bug in the handler"), False),
    (KeyError("choices"), False),
    (ProviderNotConfigured("no provider"), False),
    (_chained(TimeoutError()), True),
    (_chained(_StatusError(status_code=400)), False),
])
def test_is_failure_of_what_an_app_raises(exc: BaseException, failure: bool) -> None:
    assert is_failure(exc) is failure


def test_is_failure_of_httpx_and_aiohttp_errors() -> None:
    for exc, failure in _library_errors():
        assert is_failure(exc) is failure, exc


def test_importing_the_layer_imports_no_http_library() -> None:
    code = ("import sys, ai_saas_middleware, ai_saas_middleware.providers as p;"
            "import ai_saas_middleware.providers.failures as f;"
            "f.is_failure(TimeoutError());"
            "print(sorted(m for m in ('aiohttp', 'urllib3', 'httpx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]"


def test_a_missing_http_library_names_the_extra() -> None:
    code = ("import sys; sys.modules['aiohttp'] = None;"
            "from ai_saas_middleware.providers.transport import require;"
            "require('aiohttp')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0
    assert "pip install 'ai-saas-middleware[providers]'" in out.stderr


# --------------------------------------------------------------------------- configuration


def _models(provider: str) -> dict[str, Any]:
    return {"models": [{"id": "model-a", "provider": provider, "costPerInputToken": "0.000001",
                        "costPerOutputToken": "0.000002", "maxTokens": 8000,
                        "qualityScore": 0.7, "latencyP99Ms": 1000}]}


def test_providers_config_and_provider_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OA_KEY", "sk-abc")
    config = load_config({**_models("oa"), "providers": [
        {"id": "oa", "kind": "openai", "baseUrl": "http://127.0.0.1:9/v1/",
         "apiKeyEnv": "OA_KEY", "connectTimeout": "250ms", "readTimeout": "30s",
         "maxConnections": 8},
        {"id": "claude", "kind": "anthropic"}]})
    oa = config.providers["oa"]
    assert (oa.kind, oa.base_url, oa.api_key_env) == ("openai", "http://127.0.0.1:9/v1",
                                                       "OA_KEY")
    assert (oa.connect_timeout_s, oa.read_timeout_s, oa.max_connections) == (0.25, 30.0, 8)
    claude = config.providers["claude"]
    assert (claude.base_url, claude.api_key_env) == ("https://api.anthropic.com", None)
    providers = build_providers(config)
    assert providers.provider_for(config.models["model-a"]) is providers["oa"]
    assert set(providers) == {"oa", "claude"}
    assert "sk-abc" not in repr(providers["oa"])


def test_provider_for_a_provider_not_configured() -> None:
    config = load_config(_models("openai"))  # no providers section: nothing is checked
    with pytest.raises(ProviderNotConfigured, match="'openai'"):
        build_providers(config).provider_for(config.models["model-a"])


def test_the_seed_config_loads_unchanged() -> None:
    seed = Path("/work/shared/seed-config.yaml")
    if not seed.exists():
        seed = ROOT / "tests" / "seed-config.yaml"
    if seed.exists():
        assert load_config(seed).providers == {}


@pytest.mark.parametrize(("providers", "problems"), [
    ([{"id": "oa", "kind": "gemini"}],
     ["providers[0].kind: expected one of openai, anthropic, found string 'gemini'"]),
    ([{"id": "oa"}], ["providers[0].kind: expected one of openai, anthropic, found nothing"]),
    ([{"kind": "openai"}], ["providers[0].id: expected a provider id", "models[0].provider"]),
    ([{"id": "oa", "kind": "openai"}, {"id": "oa", "kind": "anthropic"}],
     ["providers[1].id: expected a provider id used once, found duplicate 'oa'"]),
    ([{"id": "oa", "kind": "openai", "baseUrl": "api.openai.com"}],
     ["providers[0].baseUrl: expected an http:// or https:// URL"]),
    ([{"id": "oa", "kind": "openai", "readTimeout": 0}],
     ["providers[0].readTimeout: expected a duration above 0, found number 0"]),
    ([{"id": "oa", "kind": "openai", "connectTimeout": "soon"}],
     ["providers[0].connectTimeout: expected a duration"]),
    ([{"id": "oa", "kind": "openai", "maxConnections": 0}],
     ["providers[0].maxConnections: expected a whole number >= 1"]),
    ([{"id": "oa", "kind": "openai", "colour": "red"}], ["providers[0].colour"]),
    ([{"id": "other", "kind": "openai"}],
     ["models[0].provider: expected one of the providers' ids other, found 'oa'"]),
    ([], ["models[0].provider: expected a provider id in providers, found 'oa'"]),
])
def test_bad_providers_config(providers: list[Any], problems: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({**_models("oa"), "providers": providers})
    text = str(caught.value)
    for problem in problems:
        assert problem in text


def test_an_api_key_pasted_as_apikeyenv_is_never_echoed() -> None:
    secret = "sk-proj-" + uuid.uuid4().hex
    with pytest.raises(ConfigError) as caught:
        load_config({**_models("oa"), "providers": [
            {"id": "oa", "kind": "openai", "apiKeyEnv": secret}]})
    assert "providers[0].apiKeyEnv" in str(caught.value)
    assert secret not in str(caught.value) and secret not in repr(caught.value.problems)
