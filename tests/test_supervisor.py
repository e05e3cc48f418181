"""`andon up`'s children never outlive it, it refuses busy ports up front, and it keeps its secrets:
a real `andon up` subprocess in its own ANDON_HOME, on free ports."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from api.supervisor import free_port, spawn, stop_process
from tests.procs import wait_for

ANDON = str(Path(sys.executable).parent / "andon")
PASSWORD = "s3cret-flower-pw"


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANDON_")}
    return {**env, "PYTHONUNBUFFERED": "1", "ANDON_FLOWER_BASIC_AUTH": f"ops:{PASSWORD}"}


def _alive(procs: list[psutil.Process]) -> list[str]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {' '.join(p.cmdline()[:6])}")
        except psutil.NoSuchProcess:
            pass
    return alive


def _ours(home: Path) -> list[psutil.Process]:
    """Every live process started for this ANDON_HOME (found by the variable in its environment)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("ANDON_HOME") == str(home) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """A running `andon up`, with its process tree; the last test of the module SIGKILLs it."""
    cwd = tmp_path_factory.mktemp("up")
    ports = {"--api-port": free_port(), "--flower-port": free_port(), "--redis-port": free_port()}
    proc = subprocess.Popen([ANDON, "up", *[str(x) for kv in ports.items() for x in kv], "--concurrency", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_clean_env(), cwd=cwd)
    out = []
    deadline = time.monotonic() + 120
    while "Press Ctrl-C" not in "".join(out):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(out)
        out.append(proc.stdout.readline())
    yield {"proc": proc, "home": cwd / ".andon", "ports": ports,
           "children": psutil.Process(proc.pid).children(recursive=True)}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=90)
    for left in _ours(cwd / ".andon"):  # only if a test above failed: don't leave them to the machine
        left.kill()


def test_flower_password_is_on_no_command_line(up):
    names = [" ".join(p.cmdline()) for p in up["children"]]
    assert any(" flower" in n for n in names), names
    assert not [n for n in names if PASSWORD in n]
    flower = next(p for p in up["children"] if " flower" in " ".join(p.cmdline()))
    assert flower.environ()["FLOWER_BASIC_AUTH"] == f"ops:{PASSWORD}"


def test_files_andon_up_creates_are_private(up):
    home = up["home"]
    assert _mode(home) == 0o700
    for d in (home / "logs", home / "redis"):
        assert _mode(d) == 0o700, d
    assert _mode(home / "stack.json") == 0o600
    files = [*(home / "logs").iterdir(), *(home / "redis").rglob("*"), home / "andon.db"]
    assert {f.name: oct(_mode(f)) for f in files if f.is_file()} == {f.name: oct(0o600) for f in files if f.is_file()}


def test_sigkilled_up_leaves_no_process_behind(up):
    children = up["children"]
    # redis, worker + its pool process, api, flower
    assert len(children) >= 5, [" ".join(p.cmdline()[:6]) for p in children]
    pool = [c for p in children for c in p.children(recursive=True) if c not in children]
    up["proc"].kill()
    up["proc"].wait(10)
    t0 = time.monotonic()
    wait_for(lambda: not _alive(children + pool), 20, 0.1, f"no child left: {_alive(children + pool)}")
    assert time.monotonic() - t0 < 15
    assert _ours(up["home"]) == []


def test_up_refuses_busy_ports_before_starting_anything(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port, redis_port = taken.getsockname()[1], free_port()
        done = subprocess.run([ANDON, "up", "--flower-port", str(port), "--redis-port", str(redis_port),
                               "--api-port", str(free_port())],
                              capture_output=True, text=True, env=_clean_env(), cwd=tmp_path, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and f"port {port} is in use" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / ".andon" / "logs").exists() and not (tmp_path / ".andon" / "stack.json").exists()
    with socket.socket() as probe:  # no Redis was started on its (free) port
        assert probe.connect_ex(("127.0.0.1", redis_port)) != 0


def test_a_child_started_from_a_short_lived_thread_outlives_that_thread(tmp_path):
    """PDEATHSIG follows the forking thread: children asked for by other threads are forked by one
    long-lived launcher thread, so a chaos restart from a helper thread doesn't die with it."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault(
        "proc", spawn([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "sleep.log")))
    thread.start()
    thread.join()
    try:
        time.sleep(0.5)
        assert box["proc"].poll() is None
    finally:
        stop_process(box["proc"], timeout=5)


def test_a_child_dies_with_its_parent(tmp_path):
    """The bare mechanism: a Python parent that spawns a child and is then SIGKILLed."""
    script = ("import sys, time; from pathlib import Path; from api.supervisor import spawn; "
              "p = spawn([sys.executable, '-c', 'import time; time.sleep(60)'], Path(sys.argv[1])); "
              "print(p.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "child.log")], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parent.parent)
    child = psutil.Process(int(parent.stdout.readline()))
    parent.kill()
    parent.wait(5)
    try:
        wait_for(lambda: not _alive([child]), 5, 0.05, "the child to die with its parent")
    finally:
        if _alive([child]):
            child.kill()
