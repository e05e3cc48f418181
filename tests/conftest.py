"""The test session's real parts: a Redis server, a SQLite database (and PostgreSQL where asked),
and a prefork Celery worker subprocess. Nothing is mocked, nothing runs eagerly.

Environment is set at import time, before any andon module reads its settings, so the in-process
API (TestClient), the CLI subprocesses and the worker all share the same Redis and database.
"""

from __future__ import annotations

import os
import tempfile
import threading
import uuid
from pathlib import Path

from api.supervisor import free_port
from db.settings import embedded_env

HOME = Path(tempfile.mkdtemp(prefix="andon-test-"))
REDIS_PORT = free_port()
os.environ.update(embedded_env(HOME, REDIS_PORT))
for var in ("ANDON_API_TOKEN", "ANDON_API_URL", "ANDON_API_TOKENS", "ANDON_ADMIN_TOKEN", "ANDON_PUBLIC_READS"):
    os.environ.pop(var, None)
# The CLI's job verbs and the Python client speak HTTP to ANDON_API_URL: the session's API answers
# there (the `api_server` fixture; a test that runs the CLI asks for it, or the autouse below does).
API_PORT = free_port()
os.environ["ANDON_API_URL"] = f"http://127.0.0.1:{API_PORT}"
# TestClient sends `Host: testserver`; uvicorn tests reach 127.0.0.1 (the defaults, kept here).
os.environ["ANDON_ALLOWED_HOSTS"] = "localhost,127.0.0.1,::1,testserver"

import shutil  # noqa: E402
import sys  # noqa: E402

# The test pipelines, loaded as a user's are: a module in a temp dir on PYTHONPATH, named in
# ANDON_PIPELINES, so the workers, the API (in-process and uvicorn) and the CLI all know them.
USER_PIPELINES = HOME / "userpipes"
USER_PIPELINES.mkdir()
shutil.copy(Path(__file__).parent / "fixtures" / "andon_test_pipelines.py", USER_PIPELINES)
sys.path.insert(0, str(USER_PIPELINES))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(USER_PIPELINES), os.environ.get("PYTHONPATH")]))
os.environ["ANDON_PIPELINES"] = "andon_test_pipelines"

import pytest  # noqa: E402

from api.supervisor import redis_service  # noqa: E402
from tests.procs import WorkerProcess  # noqa: E402


@pytest.fixture(scope="session")
def redis_server():
    service = redis_service(REDIS_PORT, HOME / "redis", HOME / "redis.log").start()
    yield service.proc
    service.stop(timeout=15)


@pytest.fixture(scope="session")
def database(redis_server):
    from db.migrate import upgrade

    upgrade()
    return os.environ["ANDON_DATABASE_URL"]


@pytest.fixture(scope="session")
def worker(database):
    """The shared prefork worker (2 processes). Tests that kill or stop a worker start their own."""
    proc = WorkerProcess("shared", HOME / "logs", concurrency=2).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def stopping_workers(database):
    """Workers on a queue of their own a test left running, stopping in the background: a warm stop
    takes a worker about 3 s (Celery notices the signal at its next hub timer, billiard's pool
    processes sleep 1 s before they exit, the interpreter tears down), and no later test uses that
    queue, so none need wait. All are waited for before the session's Redis and database go."""
    stopping: list[threading.Thread] = []
    yield stopping
    for thread in stopping:
        thread.join()


@pytest.fixture
def start_worker(stopping_workers):
    """Start a dedicated prefork worker on its own queue (for tests that signal, kill or stop it)."""
    started: list[tuple[WorkerProcess, bool]] = []

    def start(concurrency: int = 1, queue: str | None = None, **env: str) -> WorkerProcess:
        own = queue is None
        queue = queue or f"q-{uuid.uuid4().hex[:8]}"  # same queue → same node name (a restart)
        worker = WorkerProcess(queue, HOME / "logs", concurrency, env=env, extra_args=["-Q", queue])
        worker.queue = queue
        started.append((worker.start(), own))
        return worker

    yield start
    for worker, own in started:
        if not own:  # a later test may use that queue (and expect nothing to consume it before it does)
            worker.stop(timeout=20)
            continue
        stopping_workers.append(threading.Thread(target=worker.stop, kwargs={"timeout": 20}, daemon=True))
        stopping_workers[-1].start()


@pytest.fixture(scope="session")
def flower(worker):
    """A real Flower process with basic auth, watching the session's workers."""
    import httpx

    from api.supervisor import flower_service

    port, auth = free_port(), ("ops", "flower-pass")
    service = flower_service(port, HOME / "logs" / "flower.log", ":".join(auth), ready_timeout=60).start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=auth, timeout=20)
    yield client
    client.close()
    service.stop(timeout=15)


@pytest.fixture(scope="session")
def api_server(worker):
    """The API as a real uvicorn process (for streaming and CLI clients); yields its base URL."""
    from api.supervisor import api_service

    service = api_service(API_PORT, HOME / "logs" / "api.log").start()
    yield f"http://127.0.0.1:{API_PORT}"
    service.stop(timeout=15)


@pytest.fixture(autouse=True)
def cli_reaches_the_api(request):
    """Tests that run the `andon` CLI get the session's API at ANDON_API_URL, started on first use."""
    if "worker" in request.fixturenames and any(
            name in (request.module.__dict__ or {}) for name in ("ANDON", "andon")):
        request.getfixturevalue("api_server")


@pytest.fixture
def redis_client(redis_server):
    from tasks.process import get_redis

    return get_redis()


@pytest.fixture
def store(redis_server):
    from tasks.process import get_store

    return get_store()


@pytest.fixture
def api_client(worker):
    from fastapi.testclient import TestClient

    from api.app import app

    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="session")
def home() -> Path:
    return HOME


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0:
        shutil.rmtree(HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    from tests.pgserver import PostgresServer, postgres_available

    reason = postgres_available()
    if reason:
        pytest.skip(f"PostgreSQL tests need a local server: {reason}")
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def postgres_database(postgres_server, monkeypatch):
    """A fresh, migrated PostgreSQL database of its own for one test, as ``ANDON_DATABASE_URL``."""
    from db.migrate import upgrade
    from db.settings import get_settings

    url = postgres_server.create_database(f"andon_{uuid.uuid4().hex[:12]}")
    upgrade(url)
    monkeypatch.setenv("ANDON_DATABASE_URL", url)
    get_settings.cache_clear()
    yield url
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def rabbitmq_server():
    """A private RabbitMQ node (tests/rabbitserver.py), for the tests of andon on an AMQP broker."""
    from tests.rabbitserver import RabbitServer, rabbitmq_available

    reason = rabbitmq_available()
    if reason:
        pytest.skip(f"RabbitMQ tests need a local server: {reason}")
    try:
        server = RabbitServer().start()
    except RuntimeError as exc:
        pytest.skip(f"RabbitMQ could not start here: {str(exc).splitlines()[0]}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A fresh, migrated database of each kind, for tests of the rows themselves."""
    from db.migrate import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'rows.db'}"
    else:
        server = request.getfixturevalue("postgres_server")
        url = server.create_database(f"andon_{os.urandom(4).hex()}")
    upgrade(url)
    return url
