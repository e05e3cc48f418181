"""The API's SQLite commits leave WAL checkpoints to a background thread (db.session): a submit
never pays for one, and the WAL still gets checkpointed."""

from __future__ import annotations

import threading
import time

from sqlalchemy import text

from tests.procs import wait_for


def test_the_apis_sqlite_connections_leave_checkpoints_to_a_thread(api_client):
    from db.session import get_engine

    engine = get_engine()
    if engine.dialect.name != "sqlite":
        return
    assert api_client.post("/api/jobs", json={"documents": ["One."]}).status_code == 202
    assert any(t.name == "andon-wal-checkpoint" and t.is_alive() for t in threading.enumerate())
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0


def test_the_thread_moves_committed_pages_into_the_database_file(tmp_path):
    """A file only this process writes, with SQLite's automatic checkpoint off: its pages can only
    reach the database file through the thread's checkpoints (in WAL mode a commit writes the WAL)."""
    from db.session import checkpoint_in_background, get_engine

    path = tmp_path / "wal.db"
    url = f"sqlite:///{path}"
    engine = get_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x TEXT)")
    stop = checkpoint_in_background(url, interval_s=0.1)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")  # start from an empty WAL
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
    size = path.stat().st_size
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (?)", [("x" * 1000,)] * 2000)
    wait_for(lambda: path.stat().st_size > size + 1_000_000, 10, interval=0.05, what="a background checkpoint")
    stop()
    engine.dispose()


def test_the_thread_sleeps_while_the_process_only_reads(tmp_path):
    """Reads commit too (every session does), but a checkpoint follows only a commit that changed
    rows: a read-only API never wakes the thread (its wake-ups cost list requests their p99)."""
    from sqlalchemy import event

    from db.session import checkpoint_in_background, get_engine, session_scope

    url = f"sqlite:///{tmp_path / 'reads.db'}"
    engine = get_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x TEXT)")
    checkpoints: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: checkpoints.append(statement)
                 if "wal_checkpoint" in statement else None)
    stop = checkpoint_in_background(url, interval_s=0.02)
    try:
        with session_scope(url) as session:
            session.execute(text("INSERT INTO t VALUES ('x')"))
        wait_for(lambda: checkpoints, 10, interval=0.01, what="the checkpoint after a write")
        time.sleep(0.1)
        seen = len(checkpoints)
        for _ in range(20):
            with session_scope(url) as session:
                session.execute(text("SELECT count(*) FROM t")).scalar()
            time.sleep(0.01)
        assert len(checkpoints) == seen
        with session_scope(url) as session:
            session.execute(text("INSERT INTO t VALUES ('y')"))
        wait_for(lambda: len(checkpoints) > seen, 10, interval=0.01, what="the checkpoint after the next write")
    finally:
        stop()
        engine.dispose()
