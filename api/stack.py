"""The embedded stack behind ``andon up``: Redis, migrations, a prefork worker, the API and Flower.

Everything runs as child processes of one foreground command (started by ``api.supervisor``: each in
its own session, each dying with ``andon up`` even if it is SIGKILLed), so a Ctrl-C in the terminal
reaches only ``andon up``, which then stops them in order: worker first (a warm shutdown, so running
jobs stop at a checkpoint), then the API and Flower, Redis last.

Whatever it creates under ``ANDON_HOME`` (stack.json, logs, Redis data, the SQLite file) is readable by
its user only: ``0700`` directories and ``0600`` files from the start.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from api.supervisor import (
    PRIVATE_UMASK,
    Service,
    ServiceError,
    api_service,
    flower_service,
    free_port,
    open_private,
    port_is_free,
    redis_server_binary,
    redis_service,
    stop_in_order,
    stop_process,
    wait_until,
    worker_service,
)
from db.settings import get_settings
from tasks.errors import AndonError

__all__ = ["Stack", "StackError", "free_port", "port_is_free", "redis_server_binary", "start_redis",
           "stop_process", "wait_until"]


class StackError(AndonError):
    """The embedded stack could not start (a port in use, a missing binary, a child that died)."""


def start_redis(port: int, data_dir: Path, log: Path) -> subprocess.Popen:
    """A Redis-compatible server on 127.0.0.1:``port``, returned once it answers PING."""
    return redis_service(port, data_dir, log).start().proc


def _private_dir(path: Path, tighten: bool = True) -> Path:
    """Create ``path`` ``0700``; with ``tighten``, also an existing one (andon's own subdirectories,
    which an older version may have left ``0755``; never a home the user pointed at)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if tighten:
        path.chmod(0o700)
    return path


@dataclass
class Stack:
    """The running embedded stack; ``start()`` returns when every part answers."""

    api_port: int = 8000
    flower_port: int = 5555
    redis_port: int = 6390
    concurrency: int = 2
    flower: bool = True
    services: dict[str, Service] = field(default_factory=dict)

    def __post_init__(self) -> None:
        settings = get_settings()
        self.home = settings.home_dir
        self.logs = self.home / "logs"
        self.flower_auth = settings.flower_basic_auth or f"andon:{secrets.token_urlsafe(12)}"

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        """The running children by service name."""
        return {name: s.proc for name, s in self.services.items() if s.proc is not None}

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
        """The ``ANDON_*`` variables every child runs with (on top of this process's environment)."""
        settings = get_settings()
        return {
            "ANDON_HOME": str(self.home),
            "ANDON_REDIS_URL": self.redis_url,
            "ANDON_BROKER_URL": self.redis_url,
            "ANDON_DATABASE_URL": settings.resolved_database_url,
            "ANDON_FLOWER_BASIC_AUTH": self.flower_auth,
            "ANDON_AUTO_RESUME": os.environ.get("ANDON_AUTO_RESUME", "1"),
        }

    def check_ports(self) -> None:
        """Refuse to start (before anything runs) rather than talk to someone else's services."""
        ports = {"--redis-port": self.redis_port, "--api-port": self.api_port}
        if self.flower:
            ports["--flower-port"] = self.flower_port
        for flag, port in ports.items():
            if not port_is_free(port):
                raise StackError(f"port {port} is in use (is `andon up` already running? else pass {flag})")

    def start(self) -> None:
        self.check_ports()
        try:
            _private_dir(self.home, tighten=False)
            _private_dir(self.logs)
            self._start_all()
        except ServiceError as exc:
            self.stop()
            raise StackError(str(exc)) from exc
        except BaseException:
            self.stop()
            raise

    def _run(self, service: Service, wait: bool = True) -> Service:
        self.services[service.name] = service
        return service.start(wait=wait)

    def _start_all(self) -> None:
        env, cwd = self.env(), os.getcwd()
        self._run(redis_service(self.redis_port, _private_dir(self.home / "redis"), self.logs / "redis.log", env))
        self._migrate(env)
        worker = self._run(worker_service(f"andon-{self.redis_port}@%h", self.logs / "worker.log", self.concurrency,
                                          env=env, cwd=cwd), wait=False)
        api = self._run(api_service(self.api_port, self.logs / "api.log", "warning", env=env, cwd=cwd), wait=False)
        flower = None
        if self.flower:
            flower = self._run(flower_service(self.flower_port, self.logs / "flower.log", self.flower_auth,
                                              env=env, cwd=cwd), wait=False)
        api.wait_ready(30)
        worker.wait_ready(60)
        if flower is not None:
            flower.wait_ready(30)
        self._write_stack_file()

    def _migrate(self, env: dict[str, str]) -> None:
        log = self.logs / "migrate.log"
        fd = open_private(log)
        try:
            done = subprocess.run([sys.executable, "-c", "from db.migrate import upgrade; upgrade()"],
                                  env={**os.environ, **env}, stdout=fd, stderr=subprocess.STDOUT,
                                  umask=PRIVATE_UMASK)
        finally:
            os.close(fd)
        if done.returncode != 0:
            raise StackError(f"migrations failed with code {done.returncode} (see {log})")

    def _write_stack_file(self) -> None:
        path = get_settings().stack_file
        text = json.dumps({
            "pid": os.getpid(), "redis_port": self.redis_port, "api_port": self.api_port,
            "flower_port": self.flower_port if self.flower else None, "flower_basic_auth": self.flower_auth,
        })
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even briefly
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)  # a file left by an older run keeps its mode on O_CREAT
            f.write(text)

    def stop(self) -> None:
        """Warm-stop the worker first, then the front ends, then Redis. Leaves no process behind."""
        services = list(self.services.values())
        self.services.clear()
        stop_in_order(services)
        try:
            stack_file = get_settings().stack_file
            if json.loads(stack_file.read_text()).get("pid") == os.getpid():
                stack_file.unlink()
        except (OSError, ValueError):
            pass

