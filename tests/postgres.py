"""A private PostgreSQL cluster for the tests: initdb into a temporary folder, pg_ctl
start on a free loopback port, stopped at the end. No system service is touched.

As root (CI), PostgreSQL refuses to run; the cluster then runs as the ``postgres`` user
that Debian's package creates (``runuser``). With no PostgreSQL binaries on the machine,
:func:`find_bindir` returns None and the PostgreSQL cases are skipped (SQLite still runs).

``AI_SAAS_TEST_POSTGRES_URL`` (a superuser URL) uses a running server instead.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

APP_ROLE = "ai_saas_app"  # what the ledger connects as: no superuser, no BYPASSRLS


def find_bindir() -> str | None:
    found = shutil.which("pg_ctl")
    if found:
        return str(Path(os.path.realpath(found)).parent)
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(candidate, "pg_ctl")):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresCluster:
    """One private cluster; :meth:`database` makes a fresh database for one test."""

    def __init__(self, bindir: str):
        self.bindir = bindir
        self.port = _free_port()
        self.root = tempfile.mkdtemp(prefix="aisaas-pg-")
        self.data = os.path.join(self.root, "data")
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync",
                  "-E", "UTF8", "--locale=C")
        with open(os.path.join(self.data, "postgresql.conf"), "a", encoding="utf-8") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.root}'\nfsync = off\n"
                       "max_connections = 200\nshared_buffers = 64MB\n")
        self.start()
        with self.admin() as conn:
            conn.execute(f"CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [os.path.join(self.bindir, tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=120)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.admin_url, autocommit=True)

    def start(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "log"), "-w",
                  "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def database(self) -> tuple[str, str]:
        """(name, SQLAlchemy URL as the app role) of a new empty database."""
        name = "t_" + uuid.uuid4().hex[:16]
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {APP_ROLE}")
        return name, f"postgresql+psycopg://{APP_ROLE}@127.0.0.1:{self.port}/{name}"

    def drop(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def close(self) -> None:
        try:
            self.stop("immediate")
        except (subprocess.SubprocessError, OSError):
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class ExternalPostgres(PostgresCluster):
    """A server the environment gives (``AI_SAAS_TEST_POSTGRES_URL``, a superuser URL)."""

    def __init__(self, url: str):
        self._url = url
        from urllib.parse import urlsplit
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 5432
        with self.admin() as conn:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                                (APP_ROLE,)).fetchone():
                conn.execute(f"CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS")

    @property
    def admin_url(self) -> str:
        return self._url

    def database(self) -> tuple[str, str]:
        name, _ = super().database()
        return name, f"postgresql+psycopg://{APP_ROLE}@{self.host}:{self.port}/{name}"

    def start(self) -> None:  # pragma: no cover - not ours to start or stop
        raise RuntimeError("an external PostgreSQL is not restarted by the tests")

    stop = restart = start  # type: ignore[assignment]

    def close(self) -> None:
        pass
