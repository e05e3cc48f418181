"""The benchmark's environment and its prefork workers (started by ``api.supervisor``).

``configure_env`` runs before any andon module reads its (cached) settings.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from api.supervisor import worker_service

ROOT = Path(__file__).resolve().parent.parent


def configure_env(home: Path, redis_port: int) -> None:
    from db.settings import embedded_env

    os.environ.update(embedded_env(home, redis_port), ANDON_AUTO_RESUME="0")
    for var in ("ANDON_API_TOKEN", "ANDON_API_URL", "ANDON_JOB_TIME_LIMIT_S", "ANDON_JOB_SOFT_TIME_LIMIT_S",
                "ANDON_MAX_JOB_RSS_MB"):
        os.environ.pop(var, None)
    # the worker subprocesses import bench.bare: the repo root must be importable there too
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    os.environ["ANDON_PIPELINES"] = "bench.pipelines"  # a user pipeline with async items (bench/async_cancel.py)


class Worker:
    """``celery -A tasks.app worker -P prefork -E --include bench.bare`` as a subprocess in its own session."""

    def __init__(self, name: str, logs: Path, concurrency: int, queue: str | None = None) -> None:
        self.name = name
        self.log = logs / f"worker-{name}.log"
        self.service = worker_service(f"{name}@%h", self.log, concurrency, queues=[queue] if queue else [],
                                      extra=["--include", "bench.bare"], cwd=ROOT, name=f"worker {name}")

    def start(self, timeout: float = 60.0) -> Worker:
        self.service.start(wait=False).wait_ready(timeout)
        return self

    def stop(self) -> None:
        """Warm shutdown, then SIGKILL to the whole process group (api.supervisor.stop_process)."""
        if self.service.proc is not None:
            self.service.stop(signal.SIGTERM, timeout=30)
            self.service.proc = None


def start_all(workers: list[Worker], timeout: float = 60.0) -> list[Worker]:
    """Start ``workers`` side by side (a worker takes 1.5–3 s to be ready), then wait for each."""
    for worker in workers:
        worker.service.start(wait=False)
    for worker in workers:
        worker.service.wait_ready(timeout)
    return workers


def stop_all(workers: list[Worker]) -> None:
    """Stop ``workers`` side by side: an idle worker's warm stop takes about 3 s, mostly waiting
    (Celery's next hub timer, billiard's pool processes' 1 s sleep before they exit)."""
    threads = [threading.Thread(target=worker.stop, name=f"stop-{worker.name}") for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
