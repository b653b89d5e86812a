"""The Lua scripts through the store, below the gateway: retry idempotence and replies."""

from __future__ import annotations

import time

from ai_saas_middleware.config import load_config
from ai_saas_middleware.store.keys import KeySchema
from ai_saas_middleware.store.redis import RedisStore


def _admit_args(request_id: str, month: str, reserve: int, *extra: str) -> list[object]:
    from ai_saas_middleware.gateway import _this_month

    this, start, end = _this_month()
    if month != this:  # the bounds of another month: 1999-01
        start, end = 915148800, 917827200
    return [request_id, month, "static", "", "pro", 100, 60_000, 100_000, reserve,
            86400, start, end, *extra]


def test_a_retried_admission_is_not_counted_twice(make_config, rclient, key_prefix) -> None:
    config = load_config(make_config())
    store = RedisStore(config.redis)
    keys = KeySchema(key_prefix, 16).tenant("globex")
    month = time.strftime("%Y-%m", time.gmtime())
    script_keys = [keys.rate_limit, keys.quota(month), keys.record, keys.api_keys]

    first = store.admit(script_keys, _admit_args("req_a", month, 300))
    again = store.admit(script_keys, _admit_args("req_a", month, 300, "retry"))
    other = store.admit(script_keys, _admit_args("req_b", month, 300, "retry"))

    assert first[0] == 0 and again[0] == 0 and other[0] == 0
    assert int(rclient.get(keys.quota(month))) == 600  # req_a once, req_b once
    assert rclient.zcard(keys.rate_limit) == 2
    store.close()


def test_admission_in_another_month_asks_for_the_servers_month(make_config, key_prefix) -> None:
    config = load_config(make_config())
    store = RedisStore(config.redis)
    keys = KeySchema(key_prefix, 16).tenant("globex")
    stale = "1999-01"
    reply = store.admit([keys.rate_limit, keys.quota(stale), keys.record, keys.api_keys],
                        _admit_args("req_c", stale, 10))
    assert reply[0] == 5
    assert reply[2].decode() == time.strftime("%Y-%m", time.gmtime())
    store.close()


def test_settle_writes_all_or_nothing(make_config, rclient, key_prefix) -> None:
    """A counter that cannot move (wrong type) leaves no event and no settled marker."""
    config = load_config(make_config())
    store = RedisStore(config.redis)
    keys = KeySchema(key_prefix, 16).tenant("globex")
    rclient.hset(keys.quota("2026-01"), "oops", "1")  # a corrupted counter
    script_keys = [keys.quota("2026-01"), keys.stream, keys.settled("req_x")]
    import pytest

    from ai_saas_middleware.errors import StoreRefused

    with pytest.raises(StoreRefused, match="quota counter not moved"):
        store.settle(script_keys, [5, 60, 60, "request_id", "req_x"])
    assert rclient.xlen(keys.stream) == 0
    assert not rclient.exists(keys.settled("req_x"))

    rclient.delete(keys.quota("2026-01"))
    assert store.settle(script_keys, [5, 60, 60, "request_id", "req_x"]) is not None
    assert store.settle(script_keys, [5, 60, 60, "request_id", "req_x"]) is None  # once
    assert rclient.xlen(keys.stream) == 1 and rclient.get(keys.quota("2026-01")) == "5"
    store.close()
