"""What a prefork child does with what it inherited from the worker's main process."""

from __future__ import annotations

import gc

from tasks.signals import after_child_fork


def test_a_forked_child_freezes_what_it_inherited_out_of_the_collectors_walks():
    gc.unfreeze()
    try:
        inherited = len(gc.get_objects())
        after_child_fork()
        assert gc.get_freeze_count() >= inherited * 0.9  # the imports, frozen: a full collection skips them
        assert len(gc.get_objects()) < inherited * 0.1
    finally:
        gc.unfreeze()


_FORK_SCRIPT = r"""
import os, sys, threading, time
from sqlalchemy import text
from db import forks
from db.session import make_engine

forks.FORK_WAIT_S = float(sys.argv[2])
forks.guard_forks()
engine = make_engine("sqlite:///" + sys.argv[1])
inside, done = threading.Event(), threading.Event()

def hold(seconds):
    with engine.connect() as conn:  # checked out: this thread may be inside SQLite at any moment
        conn.execute(text("SELECT 1"))
        inside.set()
        done.wait(seconds)

worker = threading.Thread(target=hold, args=(float(sys.argv[3]),))
worker.start()
inside.wait()
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    # the child connects at once, as a new pool child does
    with make_engine("sqlite:///" + sys.argv[1]).connect() as conn:
        conn.execute(text("SELECT 1"))
    os._exit(0)
waited = time.monotonic() - t0
os.waitpid(pid, 0)
done.set()
worker.join()
print(f"{waited:.3f}")
"""


def _fork_while_a_thread_holds_a_connection(tmp_path, wait_s: float, held_s: float) -> float:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _FORK_SCRIPT, str(tmp_path / "fork.db"), str(wait_s), str(held_s)],
                         cwd=root, capture_output=True, text=True, timeout=60, check=True)
    return float(out.stdout.split()[-1])


def test_a_fork_waits_until_no_other_thread_holds_a_database_connection(tmp_path):
    """A fork taken while another thread is inside SQLite hands the child a SQLite mutex locked for
    good (make chaos: a new pool child stuck in its first connect): the fork waits for the thread."""
    waited = _fork_while_a_thread_holds_a_connection(tmp_path, wait_s=10.0, held_s=0.5)
    assert 0.4 <= waited < 5.0


def test_a_fork_waits_no_longer_than_its_bound_for_a_connection_never_returned(tmp_path):
    waited = _fork_while_a_thread_holds_a_connection(tmp_path, wait_s=0.3, held_s=30.0)
    assert 0.25 <= waited < 3.0


def test_a_redis_connection_costs_a_few_kib(redis_server):
    """hiredis's parser allocates its read buffer when a connection connects, and the pool keeps a
    connection for each thread that was in a command at once: with many jobs running in one process,
    that buffer is per job (the memory bench: 27–54 KiB per running job at redis-py's 64 KiB)."""
    import tracemalloc

    from tasks.process import get_redis

    pool = get_redis().connection_pool
    conn = None
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        conn = pool.make_connection()
        conn.connect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        if conn is not None:  # a failure to make one is the error to see, not a NameError here
            conn.disconnect()
    # 16–18 KiB here with its 4 KiB buffer (the handshake's reply, the socket, the pool's records);
    # 76 KiB with redis-py's default of 64 KiB
    assert grown < 40 * 1024, f"a new Redis connection took {grown / 1024:.1f} KiB"
