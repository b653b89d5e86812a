"""The spool cannot be forged: a private default directory, one owned by another user or
writable by others refused, only well-formed settlements of this deployment replayed; and
``ai-saas spool status / replay [--rejected]`` show and retry what was set aside."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
import yaml
from conftest import API_KEYS, reservations_held

from ai_saas_middleware import Gateway, RequestInfo
from ai_saas_middleware.cli import main
from ai_saas_middleware.errors import ConfigError
from ai_saas_middleware.spool import Spool
from ai_saas_middleware.store.keys import KeySchema
from ai_saas_middleware.types import Outcome


def _info() -> RequestInfo:
    return RequestInfo("POST", "/ai/chat", {"content-type": "application/json",
                                            "x-api-key": API_KEYS["globex"]}, b"{}")


def test_the_default_directory_is_private_per_user_not_a_shared_tmp_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert Spool.default_dir("acme") == tmp_path / "state" / "ai-saas" / "spool-acme"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert Spool.default_dir("acme") == tmp_path / "home/.local/state/ai-saas/spool-acme"
    spool = Spool(Spool.default_dir("acme"))
    assert (os.stat(spool.dir).st_mode & 0o777) == 0o700


def test_the_gateway_uses_the_private_default(make_config: Callable[..., dict[str, Any]],
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    config = make_config()
    del config["redis"]["spoolDir"]
    gateway = Gateway(config)
    assert gateway.spool.dir == Spool.default_dir(config["redis"]["keyPrefix"])
    assert not str(gateway.spool.dir).startswith("/tmp/ai-saas-spool-")
    gateway.close()


def test_a_directory_others_can_write_is_refused_naming_the_setting(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match=r"redis\.spoolDir: .*group or others can write"):
        Spool(shared)


def test_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ConfigError, match="symlink"):
        Spool(tmp_path / "link")


def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("making a directory of another user needs root")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        Spool(theirs)


def test_a_replay_at_run_time_refuses_a_directory_opened_up_since(
        make_config: Callable[..., dict[str, Any]], events: Callable[[], list[Any]]) -> None:
    gateway = Gateway(make_config())
    decision = gateway.admit(_info())
    gateway.spool.append(gateway._settle_call(decision.ticket, Outcome(200), decision.context))
    gateway.spool.dir.chmod(0o777)
    try:
        gateway.spool.replay(gateway._run)
        assert events() == []  # not replayed: anyone could have written those entries
        assert gateway.spool.pending
    finally:
        gateway.spool.dir.chmod(0o700)
    gateway.close()


def test_replay_runs_only_well_formed_settlements_of_this_deployment(
        make_config: Callable[..., dict[str, Any]], events: Callable[[], list[Any]],
        quota_used: Callable[[str], int], key_prefix: str, rclient: redis_py.Redis) -> None:
    gateway = Gateway(make_config())
    victim = gateway.admit(_info())  # globex's request, reserved
    good = gateway._settle_call(victim.ticket, Outcome(200, provider_usage=(4, 2)),
                                victim.context)
    bystander = gateway.admit(_info())  # another of globex's requests, in flight
    used = quota_used("globex")
    acme = KeySchema(key_prefix, 16).tenant("acme")
    other = KeySchema("someone-else", 16).tenant("globex")
    forged = [
        # another tenant's keys under globex's name: could move acme's counter
        ("settle", [acme.quota(victim.ticket.month), *good[1][1:]], good[2]),
        # another deployment's key schema
        ("settle", [other.quota(victim.ticket.month), *good[1][1:]], good[2]),
        # not a settlement at all
        ("admit", good[1], good[2]),
        # a token count that is not a number
        ("settle", good[1], [a if a != 4 else "4e9" for a in good[2]]),
        # a field settle.lua would put in the event that the gateway never writes
        ("settle", good[1], [*good[2], "evil", "1"]),
        # another request's reservation: would release what that request holds
        ("settle", good[1], [bystander.ticket.reservation if a == victim.ticket.reservation
                             else a for a in good[2]]),
    ]
    for entry in forged:
        gateway.spool.append(entry)
    gateway.spool.append(good)
    gateway.spool.replay(gateway._run)
    assert [e["request_id"] for e in events()] == [victim.ticket.request_id]  # the good one
    assert quota_used("globex") == used - victim.ticket.reserved_tokens + 6
    rejected = [json.loads(line) for line in
                (gateway.spool.dir / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == len(forged)
    assert all("malformed" in r["error"] for r in rejected)
    assert bystander.ticket.request_id in reservations_held(rclient, bystander.ticket.keys)
    gateway.close()


def _write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "ai-saas-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_status_and_replay_show_and_retry_what_was_set_aside(
        make_config: Callable[..., dict[str, Any]], rclient: redis_py.Redis,
        events: Callable[[], list[Any]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config()
    path = _write_config(tmp_path, config)
    gateway = Gateway(config)
    decision = gateway.admit(_info())
    stream = decision.ticket.keys.stream
    rclient.delete(stream)
    rclient.set(stream, "oops")  # a permanent refusal: the event is set aside
    gateway.settle(decision.ticket, Outcome(200, provider_usage=(2, 1)), decision.context)
    assert main(["spool", "status", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "set aside: 1 entries" in out and decision.ticket.request_id in out
    assert "globex" in out and "WRONGTYPE" in out
    assert main(["spool", "replay", "-c", str(path), "--rejected"]) == 1  # still refused
    assert "1 still set aside" in capsys.readouterr().out
    rclient.delete(stream)  # the operator fixes the cause
    assert main(["spool", "replay", "-c", str(path), "--rejected"]) == 0
    assert "1 written, 0 still set aside" in capsys.readouterr().out
    assert [e["request_id"] for e in events()] == [decision.ticket.request_id]
    assert not (gateway.spool.dir / "rejected.jsonl").exists()
    assert main(["spool", "status", "-c", str(path)]) == 0
    assert "set aside: 0 entries" in capsys.readouterr().out
    gateway.close()


def test_cli_replay_keeps_pending_entries_while_redis_is_down(
        make_config: Callable[..., dict[str, Any]], events: Callable[[], list[Any]],
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config()
    gateway = Gateway(config)
    decision = gateway.admit(_info())
    gateway.spool.append(gateway._settle_call(decision.ticket, Outcome(200), decision.context))
    down = make_config(redis={"url": "redis://127.0.0.1:1/0"})
    assert main(["spool", "replay", "-c", str(_write_config(tmp_path, down))]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unavailable" in err and "Traceback" not in err
    assert main(["spool", "replay", "-c", str(_write_config(tmp_path, config))]) == 0
    assert [e["request_id"] for e in events()] == [decision.ticket.request_id]
    gateway.close()


def test_cli_spool_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    path = _write_config(tmp_path, {"redis": {"spoolDir": str(shared)}})
    assert main(["spool", "status", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "redis.spoolDir" in err and "Traceback" not in err
