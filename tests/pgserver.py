"""Throwaway PostgreSQL 15 server for tests.

Tests need a real Postgres (SQLite hides dialect bugs), but the dev/CI box runs
as root and Postgres refuses to run as root.  So the cluster is initialised and
run as the ``postgres`` OS user, in a private data dir with its own port and
unix-socket dir, durability off for speed.  Nothing is shared with any system
cluster, and ``stop()`` leaves no postgres processes behind.  Usage:
``with PostgresServer() as pg: url = pg.create_database("andon_test")``.
"""
from __future__ import annotations

import atexit
import os
import pwd
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

IS_ROOT = os.geteuid() == 0


def _user_exists() -> bool:
    return "postgres" in {p.pw_name for p in pwd.getpwall()}


def postgres_available() -> str | None:
    """Return None if a server can be started here, else a one-line reason to skip."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not shutil.which(tool):
            return f"{tool} not found on PATH"
    if IS_ROOT and not (shutil.which("runuser") or shutil.which("su")):
        return "running as root but neither runuser nor su is available"
    if IS_ROOT and not _user_exists() and not shutil.which("useradd"):
        return "no 'postgres' OS user and useradd not available to create it"
    return None


class PostgresServer:
    """A private cluster under ``base_dir`` (data/, sock/, postgres.log).

    If ``base_dir`` is None a fresh 0o755 directory is made under /tmp and
    deleted on stop().  A caller-supplied ``base_dir`` is kept, and its parents
    must be traversable by the postgres user: pytest's /tmp/pytest-of-root/ is
    0700, so pass e.g. ``tempfile.mkdtemp(prefix="andon-pg-")`` chmod'ed 0o755.
    """

    def __init__(self, base_dir: Path | None = None, port: int | None = None):
        self._owns_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="andon-pg-", dir="/tmp")).resolve()
        with socket.socket() as s:  # free port: bind to 0, let the kernel choose
            s.bind(("127.0.0.1", 0))
            self.port = port or s.getsockname()[1]
        self.data_dir = self.base_dir / "data"
        self.sock_dir = self.base_dir / "sock"
        self.logfile = self.base_dir / "postgres.log"
        self._started = False

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the default ``postgres`` database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run cmd as the postgres user when we are root (Postgres rejects root)."""
        if IS_ROOT:
            cmd = (("runuser", "-u", "postgres", "--", *cmd) if shutil.which("runuser")
                   else ("su", "postgres", "-c", shlex.join(cmd)))
        # cwd=base_dir: postgres can't chdir into /root and would warn about it.
        return subprocess.run(cmd, cwd=self.base_dir, check=check, capture_output=True, text=True)

    def _prepare_dirs(self) -> None:
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        if not IS_ROOT:
            return
        if not _user_exists():
            subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
        pw = pwd.getpwnam("postgres")
        os.chmod(self.base_dir, 0o755)
        for d in (self.base_dir, self.sock_dir):
            os.chown(d, pw.pw_uid, pw.pw_gid)
        # Fail early and clearly rather than with an obscure initdb error.
        for parent in self.base_dir.parents:
            st = parent.stat()
            if st.st_uid != pw.pw_uid and not st.st_mode & stat.S_IXOTH:
                raise PermissionError(f"{parent} is not traversable by the postgres user "
                                      f"(mode {oct(st.st_mode & 0o777)}); use a dir under /tmp")

    def start(self) -> "PostgresServer":
        """initdb (first time only), start, and wait until TCP connections work."""
        if reason := postgres_available():
            raise RuntimeError(reason)
        self._prepare_dirs()
        opts = (f"-p {self.port} -k {self.sock_dir} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        try:
            if not (self.data_dir / "PG_VERSION").exists():
                self._run("initdb", "-D", str(self.data_dir), "-U", "postgres",
                          "--auth=trust", "-E", "UTF8")
            self._started = True
            atexit.register(self.stop)  # never leak a server if the caller forgets
            self._run("pg_ctl", "-D", str(self.data_dir), "-o", opts,
                      "-l", str(self.logfile), "-w", "start")
        except subprocess.CalledProcessError as e:
            log = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
            self.stop()
            raise RuntimeError(f"{e.cmd[-1]} failed: {e.stderr.strip()}\n{log}") from e
        deadline = time.monotonic() + 30  # pg_ctl -w waited already; prove TCP works
        while True:
            try:
                self._connect().close()
                return self
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.1)

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                               dbname="postgres", autocommit=True, connect_timeout=5)

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` and return its SQLAlchemy URL."""
        with self._connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def stop(self) -> None:
        """Fast shutdown; safe to call repeatedly, or if never/partly started.

        pg_ctl daemonises the postmaster, so after it exits it stays a zombie
        until PID 1 reaps it (1-2 s in our sandbox).  Wait for that (max 5 s) so
        callers really see no postgres processes afterwards.
        """
        pidfile = self.data_dir / "postmaster.pid"
        if self._started and pidfile.exists():
            pid = int(pidfile.read_text().split()[0])
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop", check=False)
            deadline = time.monotonic() + 5
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        self._started = False
        atexit.unregister(self.stop)
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
