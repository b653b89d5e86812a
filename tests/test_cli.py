"""The ``ai-saas`` command line as a user meets it: help, version, reserved names,
``tenants list``, ``usage`` and ``redis``.

In-process through ``cli.main`` (with capsys) against the real test Redis, and through
the installed console script in real subprocesses where the process itself matters
(``--version``, ``--help``, ``ai-saas redis`` and its signals).
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

import pytest
import redis
import yaml

from ai_saas_middleware import Gateway
from ai_saas_middleware.cli import build_parser, main

# The console script pip installed beside this interpreter (`pip install -e .`).
AI_SAAS = Path(sys.executable).parent / "ai-saas"
VISIBLE_COMMANDS = ("check-config", "tenants", "usage", "spool", "redis", "demo")
RESERVED = ("dashboard",)


@pytest.fixture(autouse=True)
def _no_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AI_SAAS_CONFIG", raising=False)


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    assert AI_SAAS.exists(), f"{AI_SAAS} is missing: install the package (pip install -e .)"
    return subprocess.run([str(AI_SAAS), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "80"})


def flat(text: str) -> str:
    """Help text with its line breaks undone (argparse wraps to the terminal's width)."""
    return " ".join(text.split())


def command_paths(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                  ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command of the parser with its own parser, the top level first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from command_paths(child, (*path, name))


# --------------------------------------------------------------------------- help and version


def test_every_argument_option_and_command_has_a_help_text() -> None:
    for path, parser in command_paths(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                listed = {choice.dest: choice.help for choice in action._choices_actions}
                for name in action.choices:
                    assert listed.get(name), f"ai-saas {' '.join(path)} {name}: no summary"
            elif not isinstance(action, argparse._HelpAction):
                assert action.help and action.help != argparse.SUPPRESS, \
                    f"ai-saas {' '.join(path)}: {action.option_strings or action.dest} has no help"
        assert parser.description, f"ai-saas {' '.join(path)}: no description"


def test_top_level_help_describes_the_tool_and_lists_only_available_commands() -> None:
    result = run_script("--help")

    assert result.returncode == 0, result.stderr
    text = flat(result.stdout)
    description = text[text.index("] COMMAND ...") + len("] COMMAND ..."):
                       text.index("options:")].strip()
    assert "``" not in description and "The ai-saas command" not in description
    assert description[0].isupper() and description.endswith(".")
    assert "configuration" in description and "tenants" in description
    for name in VISIBLE_COMMANDS:
        assert re.search(rf"^    {name}\s+\S", result.stdout, re.M), name
    for name in RESERVED:
        assert name not in result.stdout


def test_every_config_option_states_its_default_path(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    with_config = [path for path, parser in command_paths(build_parser())
                   if any("--config" in a.option_strings for a in parser._actions)]
    assert len(with_config) >= 8  # check-config, 5 tenants actions, usage, 2 spool actions

    for path in with_config:
        assert main([*path, "--help"]) == 0
        text = flat(capsys.readouterr().out)
        assert re.search(r"--config FILE, -c FILE the configuration file \(default: "
                         r"\$AI_SAAS_CONFIG if set, else \./ai-saas-config\.yaml\)", text), path


def test_check_config_reads_the_default_file_of_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make_config: Callable[..., dict[str, Any]], capsys: pytest.CaptureFixture[str]
        ) -> None:
    (tmp_path / "ai-saas-config.yaml").write_text(yaml.safe_dump(make_config()), "utf-8")
    other = tmp_path / "other.yaml"
    other.write_text("tenant: {tiers: []}\n", "utf-8")
    monkeypatch.chdir(tmp_path)

    assert main(["check-config"]) == 0
    assert "Configuration ai-saas-config.yaml is valid" in capsys.readouterr().out
    monkeypatch.setenv("AI_SAAS_CONFIG", str(other))
    assert main(["check-config"]) == 0
    assert f"Configuration {other} is valid" in capsys.readouterr().out


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    installed = version("ai-saas-middleware")

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ai-saas (ai-saas-middleware) {installed}"
    result = run_script("--version")
    assert (result.returncode, result.stdout.strip()) == \
        (0, f"ai-saas (ai-saas-middleware) {installed}")


def test_no_command_shows_the_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert "usage: ai-saas" in err and "check-config" in err


@pytest.mark.parametrize("argv", [["nope"], ["usage", "--bogus"], ["tenants"],
                                  ["tenants", "add", "x"]])
def test_a_usage_error_is_one_line_that_points_at_help(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("ai-saas") and "--help'" in err
    for name in RESERVED:
        assert name not in err  # not offered as a choice either


@pytest.mark.parametrize("argv", [[name] for name in RESERVED] + [["dashboard", "--port",
                                                                   "8080"]])
def test_reserved_commands_say_they_are_not_available_in_this_version(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == err.strip().splitlines()[0]
    assert f"'{argv[0]}' is not available in this version" in err
    assert version("ai-saas-middleware") in err


# --------------------------------------------------------------------------- tenants list


def column_starts(line: str) -> list[int]:
    """Where each cell of a table line starts (cells are two or more spaces apart)."""
    return [match.start() for match in re.finditer(r"\S+(?: \S+)*", line)]


def test_tenants_list_columns_line_up_with_the_header(
        tmp_path: Path, make_config: Callable[..., dict[str, Any]], redis_server_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ai-saas-config.yaml"
    config.write_text(yaml.safe_dump(make_config()), "utf-8")
    common = ["-c", str(config)]
    long_id = "a-tenant-whose-id-is-longer-than-the-old-column"
    assert main(["tenants", "add", long_id, "--tier", "enterprise", *common]) == 0
    assert main(["tenants", "add", "s", "--tier", "pro", *common]) == 0
    assert main(["tenants", "add-key", "s", *common]) == 0
    capsys.readouterr()

    assert main(["tenants", "list", *common]) == 0

    header, *rows = capsys.readouterr().out.splitlines()
    assert column_starts(header)[1:] and header.split("  ")[0] == "tenant"
    assert [row.split()[0] for row in rows] == ["acme", "globex", "initech", long_id, "s"]
    for row in rows:
        assert column_starts(row) == column_starts(header), f"\n{header}\n{row}"
    assert rows[-1].split() == ["s", "pro", "active", "2/0", "redis"]


def test_tenants_list_with_no_tenant_says_how_to_add_one(
        tmp_path: Path, make_config: Callable[..., dict[str, Any]],
        capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ai-saas-config.yaml"
    config.write_text(yaml.safe_dump(make_config(tenants=[])), "utf-8")

    assert main(["tenants", "list", "-c", str(config)]) == 0

    out = capsys.readouterr().out
    assert "no tenants" in out and "ai-saas tenants add" in out


# --------------------------------------------------------------------------- usage


@pytest.fixture
def config_file(tmp_path: Path, make_config: Callable[..., dict[str, Any]]) -> Path:
    path = tmp_path / "ai-saas-config.yaml"
    path.write_text(yaml.safe_dump(make_config()), "utf-8")
    return path


def test_billing_migrate_of_a_ledger_that_cannot_be_opened_is_a_message(
        config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unopenable = f"sqlite:///{tmp_path / 'no-such-dir' / 'ledger.sqlite3'}"
    assert main(["billing", "migrate", "-c", str(config_file), "--database", unopenable]) == 1

    err = capsys.readouterr().err
    assert "cannot be migrated: unable to open database file" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("month", ["2026-13", "nov", "2026-1", "2026-00", "26-01",
                                   "2026-01-05", "2026/01", "٢٠٢٦-01"])
def test_usage_month_must_be_a_real_yyyy_mm(month: str, config_file: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--month", month, "-c", str(config_file)]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "--month" in err and "YYYY-MM" in err and repr(month) in err


def test_usage_of_a_tenant_that_does_not_exist_is_an_error(
        config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--tenant", "nobody", "-c", str(config_file)]) == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("ai-saas: no tenant 'nobody'")
    assert len(err.strip().splitlines()) == 1


def test_usage_of_a_known_tenant_without_usage_says_so(
        config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tenants", "add", "newco", "--tier", "pro", "-c", str(config_file)]) == 0
    capsys.readouterr()

    for tenant, tier in (("acme", "free"), ("newco", "pro")):  # in the config; in Redis
        assert main(["usage", "--tenant", tenant, "--month", "2026-02",
                     "-c", str(config_file)]) == 0
        out = capsys.readouterr().out
        assert re.search(rf"^{tenant}\s+{tier}\s+0\s+0\s+0(\.0+)?\s+-$", out, re.M), out
        assert f"no usage recorded for tenant '{tenant}' in 2026-02." in out


def test_usage_shows_a_tenants_requests_of_the_month(
        config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gateway = Gateway(str(config_file))
    try:
        for _ in range(2):
            with gateway.request(tenant_id="globex", endpoint="/ai/chat",
                                 body={"messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 20}) as ctx:
                ctx.record_usage(100, 20)
    finally:
        gateway.close()
    this_month = time.strftime("%Y-%m", time.gmtime())

    assert main(["usage", "--tenant", "globex", "--month", this_month,
                 "-c", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^globex\s+pro\s+2\s+240\s+", out, re.M), out
    assert "no usage" not in out
    assert main(["usage", "-c", str(config_file)]) == 0  # every tenant, every month
    assert re.search(r"^globex\s+pro\s+2\s+240\s+", capsys.readouterr().out, re.M)
    assert main(["usage", "--month", "2000-01", "-c", str(config_file)]) == 0
    assert "no usage recorded in 2000-01." in capsys.readouterr().out


def test_usage_of_a_tenant_since_removed_from_the_config_is_still_shown(
        tmp_path: Path, make_config: Callable[..., dict[str, Any]],
        capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config()
    gateway = Gateway(config)
    try:
        with gateway.request(tenant_id="initech", endpoint="/ai/chat",
                             body={"messages": [{"role": "user", "content": "hi"}]}) as ctx:
            ctx.record_usage(7, 3)
    finally:
        gateway.close()
    config["tenants"] = [t for t in config["tenants"] if t["id"] != "initech"]
    path = tmp_path / "ai-saas-config.yaml"
    path.write_text(yaml.safe_dump(config), "utf-8")

    assert main(["usage", "--tenant", "initech", "-c", str(path)]) == 0
    assert re.search(r"^initech\s+enterprise\s+1\s+10\s+", capsys.readouterr().out, re.M)


# --------------------------------------------------------------------------- ai-saas redis


def lines_of(stream: IO[str]) -> queue.Queue[str | None]:
    """The lines a pipe yields, read by a thread (None at its end), so that a test can
    wait for one with a deadline instead of blocking on readline()."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_for_line(lines: queue.Queue[str | None], pattern: str, timeout_s: float = 60.0
                  ) -> re.Match[str]:
    """The first line matching ``pattern`` within ``timeout_s`` (earlier lines dropped)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            raise AssertionError(f"output ended before {pattern!r}: {seen}")
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line {pattern!r} within {timeout_s}s: {seen}")


def port_is_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_redis_serves_in_the_foreground_until_a_signal(signum: int) -> None:
    assert AI_SAAS.exists()
    process = subprocess.Popen([str(AI_SAAS), "redis", "--port", "0"], text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stderr is not None
        lines = lines_of(process.stdout)
        match = wait_for_line(lines, r"serving (redis://127\.0\.0\.1:(\d+)/0)")
        url, port = match.group(1), int(match.group(2))
        use = wait_for_line(lines, r"export REDIS_URL=(\S+)")
        assert use.group(1) == url
        client = redis.Redis.from_url(url)
        assert client.ping() is True
        assert client.set("dev-key", "1") is True
        client.close()

        process.send_signal(signum)

        assert process.wait(timeout=60) == 0, process.stderr.read()
        wait_for_line(lines, r"^stopped\.$")
        assert process.stderr.read() == ""
        assert port_is_closed(port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_redis_on_a_port_in_use_is_an_error_and_starts_nothing(
        capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        assert main(["redis", "--port", str(port)]) == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == (f"ai-saas: port {port} on 127.0.0.1 is in use (another Redis?): "
                           "choose another with --port N, or --port 0 for any free port")


@pytest.mark.parametrize("port", ["abc", "70000", "-1"])
def test_redis_port_must_be_a_port(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["redis", "--port", port]) == 2

    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--port" in err


@pytest.mark.parametrize("argv", [["worker", "--once"], ["report", "--period", "2026-11"],
                                  ["billing", "migrate"], ["billing", "audit", "--period",
                                                           "2026-11"]])
def test_billing_commands_without_the_billing_extra_say_what_to_install(
        argv: list[str], tmp_path: Path, make_config: Callable[..., dict[str, Any]]) -> None:
    path = tmp_path / "ai-saas-config.yaml"
    path.write_text(yaml.safe_dump(make_config()), "utf-8")
    code = ("import sys; sys.modules['sqlalchemy'] = None  # as if not installed\n"
            "from ai_saas_middleware.cli import main\n"
            f"sys.exit(main({[*argv, '-c', str(path)]!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"ai-saas: '{argv[0]}' needs sqlalchemy: pip install "
                                     "'ai-saas-middleware[billing]'")
