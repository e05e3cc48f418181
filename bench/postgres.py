"""The PostgreSQL column's server: a throwaway PostgreSQL started exactly as the tests start theirs
(tests/pgserver.py: ``initdb``/``pg_ctl`` as the ``postgres`` user, a private data directory and port,
``fsync=off``), with one database for the benchmark. If it can't start here, the reason, and the
benchmark goes on with SQLite only."""

from __future__ import annotations

__all__ = ["start_postgres"]


def start_postgres():
    """``(server, url, None)`` with the server running, or ``(None, None, why not)``."""
    try:
        from tests.pgserver import PostgresServer, postgres_available
    except ImportError as exc:  # psycopg missing: `pip install -e '.[dev]'`
        return None, None, f"tests/pgserver.py not importable: {exc}"
    if reason := postgres_available():
        return None, None, reason
    server = PostgresServer()
    try:
        server.start()
        return server, server.create_database("andon_bench"), None
    except Exception as exc:  # noqa: BLE001 — any failure to start means: SQLite only, and say why
        server.stop()
        return None, None, f"PostgreSQL did not start: {' '.join(str(exc).split())[:300]}"
