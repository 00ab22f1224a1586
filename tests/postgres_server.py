"""A throwaway PostgreSQL server for the tests and benchmarks: Debian's ``postgresql`` binaries,
``initdb`` into a temporary directory, ``pg_ctl start`` on a free loopback port, stopped and
deleted at the end. Nothing is installed here (``scripts/ensure_postgresql.sh`` does that).

PostgreSQL refuses to run as root, so as root the cluster belongs to ``nobody`` (``runuser``).
Authentication is ``trust`` and the server listens on 127.0.0.1 only, with no Unix socket.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

SUPERUSER = "infmap"
START_TIMEOUT_S = 60  # a busy 2-core machine


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are not installed."""


def find_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<major>/bin`` holding ``initdb`` and ``pg_ctl``."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not found:
        raise PostgresUnavailable(
            "PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb missing; "
            "apt-get install postgresql, or run scripts/ensure_postgresql.sh)"
        )
    return found[-1].parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path  # data directory and log live here
    port: int
    run_as: str | None  # the OS user the server runs as (None: the current user)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL for ``database`` through psycopg 3."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True
        )

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def _run(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        if self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=self.root)

    def stop(self) -> None:
        if self.data_dir.exists():
            self._run(self.bin_dir / "pg_ctl", "-D", self.data_dir, "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def start_server(*, durable: bool = False) -> PostgresServer:
    """initdb + start. ``durable=False`` (tests) turns off fsync: nothing here must survive a
    power cut, and it makes each test's CREATE DATABASE quick; benchmarks pass ``durable=True``."""
    bin_dir = find_bin_dir()
    run_as = "nobody" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="infmap-pg-"))
    if run_as is not None:
        shutil.chown(root, user=run_as)
    server = PostgresServer(bin_dir=bin_dir, root=root, port=free_port(), run_as=run_as)
    try:
        done = server._run(
            bin_dir / "initdb", "-D", server.data_dir, "-U", SUPERUSER, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
        options = f"-c listen_addresses=127.0.0.1 -p {server.port} -c unix_socket_directories=''"
        if not durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        done = server._run(
            bin_dir / "pg_ctl", "-D", server.data_dir, "-l", server.log_file, "-o", options,
            "-w", "-t", str(START_TIMEOUT_S), "start",
        )
        if done.returncode != 0:
            log = server.log_file.read_text() if server.log_file.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stdout.strip()}\n{log[-2000:]}")
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: PostgresServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with server._admin():
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
