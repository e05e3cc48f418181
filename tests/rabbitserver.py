"""Throwaway RabbitMQ server for tests (Debian's ``rabbitmq-server``).

The tests of andon on RabbitMQ need a real broker: kombu's AMQP transport, Celery's remote control
over fanout exchanges and RabbitMQ's own redelivery rules are what is under test. The server runs as
its own Erlang node (``andon-test-<random>@localhost``) on private ports — AMQP, Erlang distribution
and its own ``epmd`` (``ERL_EPMD_PORT``) — with every file (config, Mnesia, logs, the Erlang cookie in
``$HOME``) in a temp dir, so nothing is shared with a system instance and two sessions can't meet.
It is started as the invoking user (root is fine: the Debian wrapper in /usr/sbin would ``su
rabbitmq``; the real script in /usr/lib/rabbitmq/bin does not). ``stop()`` leaves no beam, epmd or
helper process behind. Usage: ``with RabbitServer() as rabbit: url = rabbit.url``.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from api.supervisor import port_is_free, spawn, stop_process

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
#: RabbitMQ's ``consumer_timeout`` for the test server: far above any test job, and the value the
#: README tells operators to use (above the longest job; andon's Redis visibility timeout is the same 12 h).
CONSUMER_TIMEOUT_MS = 12 * 3600 * 1000


def _tool(name: str) -> str | None:
    """The real RabbitMQ script (not Debian's /usr/sbin wrapper, which ``su``s to the rabbitmq user)."""
    candidate = RABBIT_BIN / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def rabbitmq_available() -> str | None:
    """Return None if a server can be started here, else a one-line reason to skip."""
    for name in ("rabbitmq-server", "rabbitmqctl"):
        if _tool(name) is None:
            return f"{name} not found (apt-get install rabbitmq-server)"
    if shutil.which("erl") is None and not Path("/usr/lib/erlang/bin/erl").exists():
        return "Erlang (erl) not found"
    return None


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports in 20000-44999: the CLI tools take ``RABBITMQ_DIST_PORT + 10000``
    (up to +10010) for their own node, which must stay a valid, free port too."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(20000, 45000)
        if port not in ports and port_is_free(port) and port_is_free(port + 10000):
            ports.append(port)
    return ports


class RabbitServer:
    """A private RabbitMQ node under ``base_dir`` (config, mnesia/, log/, server.log, .erlang.cookie).

    If ``base_dir`` is None a fresh directory is made under /tmp and deleted on stop().
    """

    def __init__(self, base_dir: Path | None = None, consumer_timeout_ms: int = CONSUMER_TIMEOUT_MS) -> None:
        self._owns_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="andon-rabbit-", dir="/tmp")).resolve()
        self.port, self.dist_port, self.epmd_port = _free_ports(3)
        self.nodename = f"andon-test-{os.urandom(4).hex()}@localhost"
        self.consumer_timeout_ms = consumer_timeout_ms
        self.logfile = self.base_dir / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The Celery broker URL (the default vhost ``/``; guest may connect from localhost)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def env(self) -> dict[str, str]:
        """What the server and its CLI tools need to find this node (and only this node)."""
        d = self.base_dir
        return {
            "HOME": str(d),  # the Erlang cookie is written (and read by rabbitmqctl) here
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),  # not /etc/rabbitmq's
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(d / "plugins-expand"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "rabbit.pid"),
        }

    def _write_config(self) -> None:
        d = self.base_dir
        (d / "rabbitmq-env.conf").write_text("")
        (d / "enabled_plugins").write_text("[].\n")  # no management plugin: a faster start
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            # acks_late jobs hold their message unacked while they run: RabbitMQ closes the channel
            # (and redelivers) after this long, so it must exceed the longest job (README).
            f"consumer_timeout = {self.consumer_timeout_ms}\n"
            "log.console = true\n"
            "log.console.level = warning\n"
            "log.file.level = info\n")

    def ctl(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """``rabbitmqctl -n NODE ...`` against this node."""
        return subprocess.run([_tool("rabbitmqctl") or "rabbitmqctl", "-n", self.nodename, *args],
                              env={**os.environ, **self.env}, cwd=self.base_dir, capture_output=True,
                              text=True, timeout=timeout, check=check)

    def _amqp_ok(self) -> bool:
        import amqp

        conn = amqp.Connection(f"127.0.0.1:{self.port}", userid="guest", password="guest",
                               connect_timeout=2)
        try:
            conn.connect()
            return True
        finally:
            conn.collect()

    def start(self, timeout: float = 90) -> RabbitServer:
        """Start the node and wait until it accepts AMQP connections and ``await_startup`` returns."""
        if reason := rabbitmq_available():
            raise RuntimeError(reason)
        self._write_config()
        atexit.register(self.stop)  # never leak a server if the caller forgets
        self.proc = spawn([_tool("rabbitmq-server") or "rabbitmq-server"], self.logfile, self.env,
                          cwd=self.base_dir)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.logfile.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"rabbitmq-server exited with code {self.proc.returncode}:\n{tail}")
            try:
                if self._amqp_ok():
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                tail = self.logfile.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"rabbitmq-server did not accept AMQP within {timeout:.0f}s:\n{tail}")
            time.sleep(0.2)
        self.ctl("await_startup", "--timeout", str(int(max(5, deadline - time.monotonic()))))
        return self

    def stop(self) -> None:
        """``rabbitmqctl stop``, then kill the server's process group and this node's epmd; safe to
        call repeatedly, or if never/partly started."""
        atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is not None:  # then the beam and its helpers' group (the script does not exec it)
            stop_process(proc, timeout=15, ask=lambda: self.ctl("stop", timeout=20, check=False))
            self._kill_epmd()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _kill_epmd(self) -> None:
        """epmd daemonises into its own session: stop the one on our private port (it serves no other
        node), and wait until its port is free."""
        epmd = shutil.which("epmd") or next(iter(sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))), None)
        if epmd is None:
            return
        subprocess.run([str(epmd), "-port", str(self.epmd_port), "-kill"], capture_output=True, timeout=10,
                       env={**os.environ, **self.env})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.epmd_port)) != 0:
                    return
            time.sleep(0.05)

    def __enter__(self) -> RabbitServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
