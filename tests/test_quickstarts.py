"""The README's quick starts, run exactly as written.

Every block of the README's "Quick start" that follows a ``<!-- quickstart: NAME -->``
marker is copied, byte for byte, into files of ``tmp_path``; the stand-in provider is
started by the README's own ``uvicorn`` command; each app is started by its README run
command on a real server in a subprocess (uvicorn for Starlette, Flask's Werkzeug
server, Django's ``runserver`` in a ``django-admin startproject`` layout, with Django's
default ``MIDDLEWARE``); then the README's *Try it* commands (curl, ``ai-saas usage``)
run in bash against it, and what they print is checked. The jobs run as scripts.

What the test changes, and why: the port (``8000``/``8001`` -> a free one), the Redis
(``REDIS_URL``: the test Redis) and the provider (``OPENAI_BASE_URL``), all through the
environment the README names; the keys ``ai-saas init`` printed, as ``FREE_KEY`` and
``PRO_KEY`` (the reader pastes them); and, in the file ``ai-saas init`` wrote, a key
prefix and a spool directory of this test's own, so that runs sharing the test Redis
never see each other's rate limits or usage.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # the virtualenv's bin: python, uvicorn, flask, ai-saas
START_TIMEOUT_S = 60.0  # a busy 2-core machine may take a while to import Django

pytestmark = pytest.mark.quickstarts

MARKER = re.compile(r"^<!-- quickstart: (?P<name>[^>]+?) -->\n```(?P<lang>[a-z]+)\n"
                    r"(?P<code>.*?)^```$", re.M | re.S)


def readme_blocks() -> dict[str, str]:
    """Every marked block of the README: marker name -> the code, exactly as written."""
    blocks: dict[str, str] = {}
    for match in MARKER.finditer(README.read_text(encoding="utf-8")):
        name = match["name"].strip()
        assert name not in blocks, f"README.md marks two blocks '<!-- quickstart: {name} -->'"
        blocks[name] = match["code"]
    return blocks


BLOCKS = readme_blocks()


def block(name: str) -> str:
    """The README block marked ``<!-- quickstart: NAME -->``; a missing one fails loudly."""
    if name not in BLOCKS:
        pytest.fail(f"README.md has no code block right after '<!-- quickstart: {name} -->' "
                    f"(found: {', '.join(sorted(BLOCKS)) or 'no marked block'})")
    return BLOCKS[name]


def commands(script: str) -> list[str]:
    """The commands of a shell block: continued lines joined, comments and blanks left out."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        out.append(pending + line)
        pending = ""
    assert not pending, f"a shell block ends in a continued line: {pending!r}"
    return out


def only_command(name: str, starts: str) -> str:
    """The one command of block ``name`` that starts with ``starts``, comment stripped."""
    found = [c for c in commands(block(name)) if c.startswith(starts)]
    assert len(found) == 1, f"block {name!r} should have one command {starts!r}: {found}"
    return found[0].split("  #")[0].strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_port(command: str, readme_port: int, port: int) -> str:
    """``command`` with the README's port replaced (it must be there, once)."""
    assert command.count(str(readme_port)) == 1, (readme_port, command)
    return command.replace(str(readme_port), str(port))


def port_accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Server:
    """A server subprocess started by a README command, in a session of its own."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[object]:
    """``start_server(command, port, cwd, env)``: run a README command that serves on
    ``port``, wait (bounded) until the port accepts; every one is stopped at teardown."""
    started: list[Server] = []

    def start(command: str, port: int, cwd: Path, env: dict[str, str]) -> Server:
        log = tmp_path / f"server-{len(started)}.log"
        with log.open("wb") as out:
            # A session of its own: Django's runserver reloader runs the server in a child,
            # and stopping the group stops both.
            process = subprocess.Popen(["bash", "-c", "exec " + command], cwd=cwd, env=env,
                                       stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        server = Server(process, port, log)
        started.append(server)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_accepts(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{command!r} did not serve port {port} (exit code "
                            f"{process.poll()}):\n{log.read_text(errors='replace')}")
            time.sleep(0.05)  # polling a condition, with a deadline
        return server

    yield start
    for server in reversed(started):
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGTERM)
            try:
                server.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(server.process.pid, signal.SIGKILL)
                server.process.wait(5)


@pytest.fixture
def provider_url(start_server: object, tmp_path: Path) -> str:
    """The stand-in provider, started by the README's own command (from the clone)."""
    command = only_command("services sh", "uvicorn demo_projects.provider:app")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    server = start_server(with_port(command, 8001, port), port, ROOT, env)  # type: ignore[operator]
    return f"{server.url}/v1"


@dataclass
class Place:
    """Where the reader's app lives, its config, the keys init printed, the environment."""

    directory: Path
    config: Path
    keys: dict[str, str]  # tenant -> API key
    env: dict[str, str]


KEY_LINE = re.compile(r"^(?P<tenant>\S+)\s+(?P<tier>\S+)\s+(?P<key>ais_\S+)$", re.M)


def place_app(directory: Path, redis_server_url: str, provider_url: str, spool: Path) -> Place:
    """Step 2 of the README in ``directory`` (``ai-saas init``, ``ai-saas check-config``,
    run in bash as written), then this test's own key prefix and spool put in the file."""
    directory.mkdir(parents=True, exist_ok=True)
    env = app_env(redis_server_url, provider_url)
    script = commands(block("init sh"))
    assert [c.split("#")[0].strip() for c in script] == ["ai-saas init",
                                                        "ai-saas check-config"], script
    outputs = []
    for command in script:
        done = subprocess.run(["bash", "-c", command], cwd=directory, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
        outputs.append(done.stdout)
    keys = {m["tenant"]: m["key"] for m in KEY_LINE.finditer(outputs[0])}
    assert set(keys) == {"example-free", "example-pro", "example-enterprise"}, outputs[0]
    config = directory / "ai-saas-config.yaml"
    text = config.read_text(encoding="utf-8")
    assert "  keyPrefix: aisaas\n" in text and not re.search(r"^  url:", text, re.M), \
        "ai-saas init's redis section changed: the test puts its own key prefix in it"
    config.write_text(text.replace(
        "  keyPrefix: aisaas\n",
        f"  keyPrefix: qs{uuid.uuid4().hex[:12]}  # set by tests/test_quickstarts.py\n"
        f"  spoolDir: {spool}\n"), encoding="utf-8")
    env.update(FREE_KEY=keys["example-free"], PRO_KEY=keys["example-pro"])
    return Place(directory, config, keys, env)


def app_env(redis_server_url: str, provider_url: str) -> dict[str, str]:
    """The reader's environment: the virtualenv active, ``REDIS_URL`` and
    ``OPENAI_BASE_URL`` set (to the test's Redis and provider), no real provider key, and
    nothing the test run itself set that a reader's shell would not have (pytest-django
    sets ``DJANGO_SETTINGS_MODULE`` once a Django test has run, and ``manage.py`` only
    sets its own when none is set)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "AI_SAAS_CONFIG", "REDIS_URL",
                        "DJANGO_SETTINGS_MODULE")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", REDIS_URL=redis_server_url,
               OPENAI_BASE_URL=provider_url, PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def place(tmp_path: Path, redis_server_url: str, provider_url: str) -> Place:
    return place_app(tmp_path / "myapp", redis_server_url, provider_url, tmp_path / "spool")


def write_block(name: str, directory: Path) -> Path:
    """Block ``<lang-less name> FILE`` written to ``directory / FILE``, exactly as written."""
    path = directory / name.split()[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block(name), encoding="utf-8")
    return path


# ------------------------------------------------------------------ what the reader sees


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: dict[str, object]


def parse_curl_i(text: str) -> Reply:
    """What ``curl -si`` printed: the status line, the headers, the JSON body."""
    head, _, body = text.replace("\r\n", "\n").partition("\n\n")
    status_line, *lines = head.strip().splitlines()
    status = int(status_line.split()[1])
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    try:
        parsed = json.loads(body)
    except ValueError:  # e.g. Django's HTML 403 page: the status assertion says more
        parsed = {"(not JSON)": body[:300]}
    return Reply(status, headers, parsed)


def usage_rows(text: str) -> dict[str, tuple[str, int, str]]:
    """``ai-saas usage``'s table: tenant -> (tier, requests, models)."""
    lines = text.splitlines()
    head = re.split(r"\s{2,}", lines[0].strip())
    assert head[:3] == ["tenant", "tier", "requests"] and head[-1] == "models", lines[0]
    rows = {}
    for line in lines[2:]:
        if line.startswith("total cost"):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = (cells[1], int(cells[2]), cells[-1])
    return rows


def wait_for_usage(place: Place, expected: dict[str, tuple[str, int, str]]) -> str:
    """Run ``ai-saas usage --config FILE`` until it shows ``expected`` (deadline 15 s):
    a web request settles after its response went to the client."""
    deadline = time.monotonic() + 15
    while True:
        done = subprocess.run([str(BIN / "ai-saas"), "usage", "--config", str(place.config)],
                              env=place.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        if usage_rows(done.stdout) == expected or time.monotonic() > deadline:
            assert usage_rows(done.stdout) == expected, done.stdout
            return done.stdout
        time.sleep(0.1)  # polling a condition, with a deadline


def try_it(place: Place, port: int) -> None:
    """The README's *Try it* commands in bash against the app on ``port``, each one's
    output checked: 200 with the chosen model, routing by quality, 429 past the rate
    limit, 401 for a bad key, 400 for bad JSON, and ``ai-saas usage`` showing them."""
    script = commands(block("try sh"))
    # The first command is the reader pasting init's keys: the test set them already.
    assert script[0].startswith("export FREE_KEY=") and "PRO_KEY=" in script[0], script[0]
    script = script[1:]
    assert sum("localhost:8000" in c for c in script) == 5, script
    lines = ["set -e"]
    for i, command in enumerate(script):
        lines += [f"printf '\\n@@command {i}@@\\n'",
                  command.replace("localhost:8000", f"127.0.0.1:{port}")]
    done = subprocess.run(["bash", "-c", "\n".join(lines)], cwd=place.directory,
                          env=place.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    outputs = re.split(r"\n@@command \d+@@\n", "\n" + done.stdout)[1:]
    assert len(outputs) == len(script) == 7, done.stdout
    assert script[0].startswith("BODY=") and outputs[0] == ""

    free = parse_curl_i(outputs[1])
    assert free.status == 200, outputs[1]
    assert free.headers["x-ai-model"] == "model-fast"  # the cheaper model of tier free
    assert free.body["model"] == "model-fast"  # ... and the one the provider was sent
    assert free.headers["x-request-id"]
    assert free.body["usage"]

    pro = parse_curl_i(outputs[2])
    assert pro.status == 200, outputs[2]
    assert pro.headers["x-ai-model"] == pro.body["model"] == "model-large"

    assert outputs[3].split() == ["200"] * 9 + ["429"]

    bad_key = parse_curl_i(outputs[4])
    assert bad_key.status == 401, outputs[4]
    assert bad_key.body["error"]["code"] == "invalid_api_key"  # type: ignore[index]

    bad_json = parse_curl_i(outputs[5])
    assert bad_json.status == 400, outputs[5]
    assert bad_json.body["error"]["code"] == "invalid_json"  # type: ignore[index]

    assert script[6] == "ai-saas usage"
    expected = {"example-free": ("free", 10, "model-fast x10"),
                "example-pro": ("pro", 1, "model-large x1")}
    rows = usage_rows(outputs[6])
    # Each row shows once its last request settled (after the response went out).
    assert set(rows) <= set(expected), outputs[6]
    wait_for_usage(place, expected)


# ------------------------------------------------------------------ the tests


def test_every_quick_start_is_marked_in_the_readme() -> None:
    names = {"services sh", "init sh", "try sh", "starlette app.py",
             "starlette run sh", "django startproject sh", "django mysite/settings.py append",
             "django mysite/urls.py", "django mysite/views.py", "django run sh",
             "flask app.py", "flask run sh", "job job.py", "job run sh", "job ajob.py",
             "job arun sh"}
    missing = names - set(BLOCKS)
    assert not missing, f"README.md lacks the quickstart markers {sorted(missing)}"
    section = README.read_text(encoding="utf-8").split("## Quick start\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    assert section.count("<!-- quickstart:") == len(names)
    assert "ai-saas redis" in commands(block("services sh"))[0]  # run by tests/test_cli.py


def test_starlette_quick_start_under_uvicorn(place: Place, start_server: object) -> None:
    write_block("starlette app.py", place.directory)
    port = free_port()
    command = with_port(only_command("starlette run sh", "uvicorn app:app"), 8000, port)
    start_server(command, port, place.directory, place.env)  # type: ignore[operator]
    try_it(place, port)


def test_flask_quick_start_under_werkzeug(place: Place, start_server: object) -> None:
    write_block("flask app.py", place.directory)
    port = free_port()
    command = with_port(only_command("flask run sh", "flask --app app run"), 8000, port)
    start_server(command, port, place.directory, place.env)  # type: ignore[operator]
    try_it(place, port)


def test_django_quick_start_with_the_default_middleware(tmp_path: Path, redis_server_url: str,
                                                        provider_url: str,
                                                        start_server: object) -> None:
    startproject = only_command("django startproject sh", "django-admin startproject")
    done = subprocess.run(["bash", "-c", startproject], cwd=tmp_path,
                          env=app_env(redis_server_url, provider_url),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # ai-saas init beside manage.py, where AI_SAAS["CONFIG"] looks
    project = place_app(tmp_path / "mysite", redis_server_url, provider_url,
                        tmp_path / "spool")
    settings = project.directory / "mysite" / "settings.py"
    generated = settings.read_text(encoding="utf-8")
    assert "django.middleware.csrf.CsrfViewMiddleware" in generated  # the default MIDDLEWARE
    with settings.open("a", encoding="utf-8") as out:
        out.write("\n" + block("django mysite/settings.py append"))
    write_block("django mysite/urls.py", project.directory)
    write_block("django mysite/views.py", project.directory)
    port = free_port()
    command = with_port(only_command("django run sh", "python manage.py runserver"), 8000,
                        port)
    start_server(command, port, project.directory, project.env)  # type: ignore[operator]
    try_it(project, port)


def run(place: Place, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=place.directory, env=place.env,
                          capture_output=True, text=True, timeout=120)


def test_background_job_quick_starts_as_scripts(place: Place) -> None:
    write_block("job job.py", place.directory)
    write_block("job ajob.py", place.directory)
    job = only_command("job run sh", "python job.py example-free")
    done = run(place, job)
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["model-fast"] * 2

    # Nine texts more for tier free's 10 a minute: eight answered, then a refusal.
    done = run(place, "python job.py example-free " + " ".join(f"text-{i}" for i in range(9)))
    assert done.returncode == 1
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["model-fast"] * 8
    assert re.fullmatch(r"rate limited: try again in [1-9][0-9]*s\n", done.stderr), done.stderr

    done = run(place, job.replace("example-free", "nobody"))
    assert done.returncode == 1
    assert done.stderr.startswith("refused: ") and "Traceback" not in done.stderr, done.stderr

    done = run(place, only_command("job arun sh", "python ajob.py example-pro"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "model-small"  # the cheapest of tier pro

    # A job settles before its block ends: the usage is there at once.
    wait_for_usage(place, {"example-free": ("free", 10, "model-fast x10"),
                           "example-pro": ("pro", 1, "model-small x1")})
