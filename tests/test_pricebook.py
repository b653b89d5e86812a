"""The price book (pricebook.py, pricebook.lua) against a real Redis: run-time overrides
of the model profiles, their versions and history, and how every process follows them.

Two books with stores of their own stand for two processes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from faults import PrivateRedis, wait_until

from ai_saas_middleware.breakers import BreakerBoard
from ai_saas_middleware.config import Config, load_config
from ai_saas_middleware.errors import ConfigError
from ai_saas_middleware.pricebook import PriceBook, PriceBookAdmin, UnknownModel, UnknownVersion
from ai_saas_middleware.pricing import cost_of
from ai_saas_middleware.store.keys import KeySchema
from ai_saas_middleware.store.redis import RedisStore
from ai_saas_middleware.watch import Watch


@pytest.fixture
def config(make_config: Callable[..., dict[str, Any]]) -> Config:
    return load_config(make_config())


@pytest.fixture
def admin(config: Config) -> Iterator[PriceBookAdmin]:
    store = RedisStore(config.redis)
    yield PriceBookAdmin(config, store)
    store.close()


@pytest.fixture
def books(config: Config) -> Iterator[Callable[..., PriceBook]]:
    """``books()``: a process's price book, kept by a watch thread of its own (a store of
    its own), started and past its first read."""
    made: list[Watch] = []

    def make() -> PriceBook:
        keys = KeySchema(config.redis.key_prefix, config.redis.shards)
        book = PriceBook(config, keys)
        watch = Watch(lambda: RedisStore(config.redis), True,
                      BreakerBoard(config.routing.circuit_breaker, keys), book)
        watch.start()
        made.append(watch)
        return book

    yield make
    for watch in made:
        watch.close()


def test_before_any_override_the_book_is_the_configuration_at_version_0(books, config):
    book = books()
    assert book.rounds >= 1  # read
    assert book.version == 0
    assert dict(book.models) == dict(config.models)


def test_a_change_is_seen_by_every_process_within_the_refresh_period(books, admin):
    a, b = books(), books()
    assert a.version == 0 and b.version == 0
    admin.set("model-small", {"costPerInputToken": Decimal("0.0000002")})
    for book in (a, b):
        wait_until(lambda book=book: book.version == 1, 5, "the book at version 1")
        small = book.models["model-small"]
        assert small.cost_per_input_token == Decimal("0.0000002")
        assert small.cost_per_output_token == Decimal("0.0000006")  # not overridden
        assert book.current.overridden("model-small") == ("costPerInputToken",)


def test_every_change_is_a_new_version_and_overrides_merge(admin, config):
    first = admin.set("model-large", {"costPerOutputToken": Decimal("0.000012")})
    second = admin.set("model-large", {"qualityScore": Decimal("0.95"), "latencyP99Ms": 3000,
                                       "maxTokens": 64000})
    assert (first.version, second.version) == (1, 2)
    large = second.models["model-large"]
    assert large.cost_per_output_token == Decimal("0.000012")  # kept from version 1
    assert (large.quality_score, large.latency_p99_ms, large.max_tokens) == (0.95, 3000, 64000)
    assert large.provider == config.models["model-large"].provider
    reset = admin.reset("model-large")
    assert reset is not None and reset.version == 3
    assert reset.models["model-large"] == config.models["model-large"]
    assert admin.reset("model-large") is None  # nothing left to drop: no new version
    assert admin.read()[0].version == 3


def test_a_disabled_model_disappears_and_comes_back_when_enabled(books, admin):
    book = books()
    admin.set("model-fast", {"enabled": False})
    wait_until(lambda: book.version == 1)
    assert "model-fast" not in book.models
    assert book.current.disabled == frozenset({"model-fast"})
    admin.set("model-fast", {"enabled": True})
    wait_until(lambda: book.version == 2)
    assert "model-fast" in book.models
    assert book.current.overridden("model-fast") == ()


@pytest.mark.parametrize("fields, path", [
    ({"costPerInputToken": Decimal("-0.1")}, "models[model-small].costPerInputToken"),
    ({"costPerOutputToken": "abc"}, "models[model-small].costPerOutputToken"),
    ({"qualityScore": Decimal("1.5")}, "models[model-small].qualityScore"),
    ({"maxTokens": 0}, "models[model-small].maxTokens"),
    ({"latencyP99Ms": 12.5}, "models[model-small].latencyP99Ms"),
    ({"enabled": "no"}, "models[model-small].enabled"),
    ({"provider": "other"}, "models[model-small].provider"),  # not overridable
    ({"colour": "red"}, "models[model-small].colour"),
])
def test_invalid_overrides_are_refused_with_the_path_and_change_nothing(admin, fields, path):
    with pytest.raises(ConfigError) as caught:
        admin.set("model-small", fields)
    assert [p.path for p in caught.value.problems] == [path]
    assert admin.read()[0].version == 0


def test_a_new_model_needs_every_field(admin):
    with pytest.raises(ConfigError) as caught:
        admin.set("model-new", {"costPerInputToken": Decimal("0.000001")})
    (problem,) = caught.value.problems
    assert problem.path == "models[model-new]"
    for name in ("provider", "costPerOutputToken", "maxTokens", "qualityScore", "latencyP99Ms"):
        assert name in problem.found
    made = admin.set("model-new", {"provider": "openai", "costPerInputToken": Decimal("1E-6"),
                                   "costPerOutputToken": Decimal("0.000002"),
                                   "maxTokens": 8000, "qualityScore": Decimal("0.7"),
                                   "latencyP99Ms": 700})
    assert made.models["model-new"].cost_per_input_token == Decimal("0.000001")
    with pytest.raises(UnknownModel):
        admin.reset("model-nobody")


def test_a_past_versions_prices_can_be_reproduced(admin, config, rclient, key_prefix):
    admin.set("model-small", {"costPerInputToken": Decimal("0.0000002")})
    admin.set("model-small", {"costPerInputToken": Decimal("0.0000003"),
                              "costPerOutputToken": Decimal("0.0000009")})
    admin.set("model-medium", {"enabled": False})
    # An event costed at version 1 is reproduced exactly from its price_version.
    v1 = admin.at_version(1)
    assert cost_of(v1.models["model-small"], 1000, 100) == Decimal("0.00026")
    v2 = admin.at_version(2)
    assert cost_of(v2.models["model-small"], 1000, 100) == Decimal("0.00039")
    assert "model-medium" in v2.models and "model-medium" not in admin.at_version(3).models
    assert admin.at_version(0).models == config.models
    with pytest.raises(UnknownVersion):
        admin.at_version(4)
    # The history is plain JSON a billing job reads without this package.
    entry = json.loads(rclient.hget(f"{key_prefix}:{{models}}:history", "2"))
    assert entry["book"] == {"model-small": {"costPerInputToken": "0.0000003",
                                             "costPerOutputToken": "0.0000009"}}


def test_a_stored_override_the_config_would_refuse_is_not_used(books, config, rclient,
                                                               key_prefix, caplog):
    book = books()
    rclient.hset(f"{key_prefix}:{{models}}:book", "model-small",
                 json.dumps({"costPerInputToken": "-1"}))
    rclient.set(f"{key_prefix}:{{models}}:version", 7)
    rclient.publish(f"{key_prefix}:{{models}}:changed", "7")  # as every writer does
    wait_until(lambda: book.version == 7)
    assert book.models["model-small"] == config.models["model-small"]
    assert "models[model-small].costPerInputToken" in caplog.text


def test_the_version_and_book_change_together_under_concurrent_writers(admin, config):
    import threading

    def writer(model: str) -> None:
        store = RedisStore(config.redis)
        own = PriceBookAdmin(config, store)
        for i in range(10):
            own.set(model, {"latencyP99Ms": 100 + i})
        store.close()

    threads = [threading.Thread(target=writer, args=(m,)) for m in ("model-small", "model-fast")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot, problems = admin.read()
    assert not problems and snapshot.version == 20
    assert snapshot.models["model-small"].latency_p99_ms == 109
    assert snapshot.models["model-fast"].latency_p99_ms == 109


def test_the_book_is_kept_while_redis_is_unreachable_and_followed_after(
        make_config, tmp_path, caplog):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("needs redis-server on PATH (a server of its own, stopped and started)")
    server = PrivateRedis(binary, tmp_path / "data")
    try:
        config = load_config(make_config(redis={"url": server.url, "retryInterval": "50ms"}))
        store = RedisStore(config.redis)
        admin = PriceBookAdmin(config, store)
        keys = KeySchema(config.redis.key_prefix, config.redis.shards)
        book = PriceBook(config, keys)
        watch = Watch(lambda: RedisStore(config.redis), True,
                      BreakerBoard(config.routing.circuit_breaker, keys), book)
        watch.start()
        admin.set("model-small", {"qualityScore": Decimal("0.7")})
        wait_until(lambda: book.version == 1)
        server.stop()
        wait_until(lambda: "breakers, price book and statistics not read" in caplog.text)
        assert book.version == 1 and book.models["model-small"].quality_score == 0.7
        server.start()
        admin.set("model-small", {"qualityScore": Decimal("0.75")})
        wait_until(lambda: book.version == 2, 10, "the book followed once Redis is back")
        assert book.models["model-small"].quality_score == 0.75
        watch.close()
        store.close()
    finally:
        server.close()
