"""The same scripts and keys on a real 3-node Redis Cluster.

The key schema puts every key of a tenant, and its shard's stream, behind one hash tag,
so admit.lua and settle.lua each touch one slot. This starts a cluster (redis-server and
redis-cli from PATH, else the embedded Valkey's server and valkey-cli), spreads tenants
over many shards (so over all three nodes), and runs admission and settlement through
``redis+cluster://`` with the sync and the asyncio gateway.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis
from conftest import BASE_CONFIG, PATIENT_REDIS
from redis.cluster import RedisCluster

from ai_saas_middleware import AsyncGateway, Gateway, RequestInfo
from ai_saas_middleware.embedded import LocalServer, find_server_binary, start_server
from ai_saas_middleware.types import Outcome
from ai_saas_middleware.usage import meter_for


def _cli_for(server_binary: str) -> str | None:
    sibling = os.path.join(os.path.dirname(server_binary),
                           "valkey-cli" if "valkey" in os.path.basename(server_binary)
                           else "redis-cli")
    return sibling if os.access(sibling, os.X_OK) else shutil.which("redis-cli")


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    binary = find_server_binary()
    cli = _cli_for(binary) if binary else None
    if binary is None or cli is None:
        pytest.skip("no redis-server/valkey-server with its cli to build a cluster")
    nodes: list[LocalServer] = []
    try:
        for _ in range(3):
            nodes.append(start_server(binary, args=("--cluster-enabled", "yes",
                                                    "--cluster-config-file", "nodes.conf",
                                                    "--cluster-node-timeout", "2000")))
        addresses = [f"127.0.0.1:{n.port}" for n in nodes]
        subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = redis.Redis(port=nodes[0].port).execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" in text:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the cluster did not reach cluster_state:ok")
        yield f"redis+cluster://127.0.0.1:{nodes[0].port}"
    finally:
        for node in nodes:
            node.stop()


def _config(url: str, tmp_path: Any, key_prefix: str) -> dict[str, Any]:
    config = dict(BASE_CONFIG)
    tenants = [{"id": f"tenant-{i}", "tier": "pro"} for i in range(24)]
    config["tenants"] = list(BASE_CONFIG["tenants"]) + tenants
    config["redis"] = {"url": url, "keyPrefix": key_prefix, "shards": 16,
                       "spoolDir": str(tmp_path / "spool"), **PATIENT_REDIS}
    return config


def _check_settled(cluster_url: str, gateway: Gateway | AsyncGateway, tenants: list[str],
                   tokens: str, cost: str) -> set[str]:
    """Each tenant's counter and its one stream entry, read from the cluster; returns the
    nodes their slots live on."""
    month = time.strftime("%Y-%m", time.gmtime())
    used_nodes = set()
    with RedisCluster.from_url(cluster_url.replace("+cluster", ""),
                               decode_responses=True) as client:
        for tenant in tenants:
            keys = gateway.keys.tenant(tenant)
            assert client.get(keys.quota(month)) == tokens
            entries = [f for _, f in client.xrange(keys.stream) if f["tenant_id"] == tenant]
            assert len(entries) == 1 and entries[0]["cost"] == cost
            used_nodes.add(client.get_node_from_key(keys.stream).name)
    return used_nodes


def _info(tenant: str) -> RequestInfo:
    return RequestInfo("POST", "/ai/chat", {"content-type": "application/json"},
                       b'{"messages": [{"role": "user", "content": "hello"}]}', tenant_id=tenant)


def test_admit_and_settle_on_a_cluster(cluster_url: str, tmp_path: Any,
                                       key_prefix: str) -> None:
    gateway = Gateway(_config(cluster_url, tmp_path, key_prefix))
    tenants = [f"tenant-{i}" for i in range(24)]
    for tenant in tenants:
        decision = gateway.admit(_info(tenant))
        assert decision.allowed, decision.body
        assert decision.ticket is not None
        gateway.settle(decision.ticket, Outcome(200, provider_usage=(10, 5)), decision.context)
    assert not gateway.spool.pending  # nothing fell back to the local spool
    # 10 x 0.00000015 + 5 x 0.0000006
    used_nodes = _check_settled(cluster_url, gateway, tenants, "15", "0.0000045")
    assert len(used_nodes) == 3  # the tenants' slots really are spread over every node
    gateway.close()


async def test_async_gateway_on_a_cluster(cluster_url: str, tmp_path: Any,
                                          key_prefix: str) -> None:
    gateway = AsyncGateway(_config(cluster_url, tmp_path, key_prefix))
    tenants = [f"tenant-{i}" for i in range(12)]
    for tenant in tenants:
        decision = await gateway.admit(_info(tenant))
        assert decision.allowed, decision.body
        assert decision.ticket is not None
        await gateway.settle(decision.ticket, Outcome(200, provider_usage=(3, 4)),
                             decision.context)
    assert not gateway.spool.pending
    # 3 x 0.00000015 + 4 x 0.0000006
    used_nodes = _check_settled(cluster_url, gateway, tenants, "7", "0.00000285")
    assert len(used_nodes) == 3
    await gateway.close()


def test_money_budgets_on_a_cluster(cluster_url: str, tmp_path: Any, key_prefix: str) -> None:
    config = _config(cluster_url, tmp_path, key_prefix)
    config["tenant"] = {"tiers": [dict(t, monthlyBudget="1", dailyBudget="1")
                                  for t in BASE_CONFIG["tenant"]["tiers"]]}
    gateway = Gateway(config)
    tenants = [f"tenant-{i}" for i in range(24)]
    try:
        for tenant in tenants:
            decision = gateway.admit(_info(tenant))
            assert decision.allowed, decision.body
            gateway.settle(decision.ticket, Outcome(200, provider_usage=(10, 5)),
                           decision.context)
        assert not gateway.spool.pending
        _check_settled(cluster_url, gateway, tenants, "15", "0.0000045")
        month = time.strftime("%Y-%m", time.gmtime())
        day = time.strftime("%Y-%m-%d", time.gmtime())
        with RedisCluster.from_url(cluster_url.replace("+cluster", ""),
                                   decode_responses=True) as client:
            for tenant in tenants:
                keys = gateway.keys.tenant(tenant)
                # $0.0000045 in picodollars, on the month's and the day's spend
                assert client.get(keys.spent_month(month)) == "4500000"
                assert client.get(keys.spent_day(day)) == "4500000"
    finally:
        gateway.close()


def test_breakers_and_the_price_book_are_shared_across_a_cluster(
        cluster_url: str, tmp_path: Any, key_prefix: str) -> None:
    from faults import wait_until

    from ai_saas_middleware.errors import NoHealthyModel
    from ai_saas_middleware.pricebook import PriceBookAdmin

    config = _config(cluster_url, tmp_path, key_prefix)
    config["routing"] = {"circuitBreaker": {"errorThreshold": 2, "resetTimeout": "30s"}}
    one, other = Gateway(config), Gateway(config)
    try:
        assert not other.breakers.any_open  # (its watch starts, and subscribes)
        wait_until(lambda: other.watch._ready.is_set())

        def down(model: Any) -> str:
            raise ConnectionError(f"{model.id} is down")

        for _ in range(2):  # tier pro's three models each fail twice: all open
            decision = one.admit(_info("tenant-1"))
            try:
                decision.context.execute(down)
            except NoHealthyModel:
                pass
            one.settle(decision.ticket, Outcome(503), decision.context)
        wait_until(lambda: set(other.breakers._open) == {"model-small", "model-medium",
                                                         "model-large"},
                   what="the other gateway to see every breaker open")
        refused = other.admit(_info("tenant-2"))
        assert (refused.status, refused.error_code) == (503, "no_healthy_model")

        PriceBookAdmin(one.config, one.store, one.keys).set(
            "model-fast", {"costPerInputToken": "0.0000002"})
        wait_until(lambda: other.prices.current.version == 1, what="the new price book")
        assert other.prices.current.models["model-fast"].cost_per_input_token == \
            Decimal("0.0000002")
    finally:
        one.close()
        other.close()


def test_the_response_cache_on_a_cluster(cluster_url: str, tmp_path: Any,
                                         key_prefix: str) -> None:
    """Every cache script touches its tenant's slot alone, whichever node holds it: an exact
    and a semantic hit for tenants spread over the three nodes (issue 11)."""
    config = _config(cluster_url, tmp_path, key_prefix)
    config["cache"] = {"enabled": True}
    gateway = Gateway(config)
    reply = (b'{"object":"chat.completion","choices":[{"index":0,"finish_reason":"stop",'
             b'"message":{"role":"assistant","content":"Use the reset link."}}],'
             b'"usage":{"prompt_tokens":10,"completion_tokens":5}}')

    def ask(tenant: str, text: str) -> str:
        body = json.dumps({"messages": [{"role": "user", "content": text}]}).encode()
        decision = gateway.admit(RequestInfo("POST", "/ai/chat",
                                             {"content-type": "application/json"}, body,
                                             tenant_id=tenant))
        if not decision.allowed:
            assert decision.status == 200 and decision.body == reply
            return dict(decision.headers)["x-ai-cache"]
        assert decision.context is not None and decision.ticket is not None
        meter = meter_for(decision.context)
        meter.start(200, "application/json")
        meter.feed(reply)
        meter.finish()
        gateway.settle(decision.ticket, meter.outcome(), decision.context)
        return dict(decision.headers)["x-ai-cache"]

    tenants = [f"tenant-{i}" for i in range(12)]
    try:
        for tenant in tenants:
            assert ask(tenant, "How do I reset my password?") == "miss"
            assert ask(tenant, "How do I reset my password?") == "hit"
            assert ask(tenant, "How can I reset my password?") == "hit"
        assert not gateway.spool.pending
        with RedisCluster.from_url(cluster_url.replace("+cluster", ""),
                                   decode_responses=True) as client:
            nodes = {client.get_node_from_key(gateway.keys.tenant(t).cache_lru).name
                     for t in tenants}
        assert len(nodes) == 3
    finally:
        gateway.close()
