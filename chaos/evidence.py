"""What the checks read once the phases are over: the rows, the API's partial results, Celery's result
states, messages parked in kombu's ``unacked`` hash, leftover temp dirs."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from chaos.errors import Transient


class Evidence:
    """What the checks read once the phases are over: the rows, the API's partial results, Celery's result Mixed into ``chaos.harness.Harness``, whose state it uses."""

    def load_rows(self):
        from sqlalchemy import select

        from db.models import Job, JobEvent, JobItem
        from db.session import session_scope

        with session_scope() as session:
            jobs = list(session.scalars(select(Job)))
            items = list(session.scalars(select(JobItem)))
            events = list(session.scalars(select(JobEvent)))
            for obj in jobs + items + events:
                session.expunge(obj)
        return jobs, items, events

    def supersede_winners(self) -> dict[str, str]:
        """supersede key → the job andon holds as its newest (the ``supersede_keys`` table)."""
        from sqlalchemy import select

        from db.models import SupersedeKey
        from db.session import session_scope

        with session_scope() as session:
            return dict(session.execute(select(SupersedeKey.key, SupersedeKey.job_id)).all())

    def fetch_partials(self, job_ids: list[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}

        def get(job_id: str) -> None:
            def call():
                answer = self.client().get(f"{self.stack.api_url}/api/jobs/{job_id}/partial-results")
                if answer.status_code >= 500:
                    raise Transient(str(answer.status_code))
                return answer

            answer = self.retry("partial-results", call)
            if answer.status_code == 200:
                out[job_id] = answer.json()

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(get, job_ids))
        return out

    def celery_states(self, jobs: list, settle_s: float = 20.0) -> dict[str, str | None]:
        """Each job's state in Celery's result backend, once the broker queue is drained (a job cancelled
        while queued gets its REVOKED when a worker takes its message off the queue)."""
        from tasks.process import get_redis

        redis = get_redis()
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline and self.retry("queue length", lambda: redis.llen("andon")):
            time.sleep(0.25)
        # the state each row implies; andon's sweep writes it within seconds where the run couldn't
        # (tasks/results.py), so wait (within settle_s) for agreement, not just for any state
        want = {j.id: {"cancelled": "REVOKED", "completed": "SUCCESS", "failed": "FAILURE"}[j.status]
                for j in jobs if j.status in ("cancelled", "completed", "failed")}
        states: dict[str, str | None] = {}
        while True:
            missing = sorted(j for j, state in want.items() if states.get(j) != state)
            raws = self.retry("result backend", lambda: redis.mget([f"celery-task-meta-{j}" for j in missing])) \
                if missing else []
            for job_id, raw in zip(missing, raws):
                meta = json.loads(raw) if raw else {}
                states[job_id] = meta.get("status")
                result = meta.get("result") if isinstance(meta.get("result"), dict) else {}
                self.celery_meta[job_id] = {"exc_type": result.get("exc_type"), "date_done": meta.get("date_done")}
            if not missing or time.monotonic() > deadline:
                return states
            time.sleep(0.5)

    def parked_messages(self) -> dict[str, datetime]:
        """Task messages in kombu's ``unacked`` hash once every job is done: delivered to a worker that
        never acked them, so Redis redelivers them only after the visibility timeout (12 h in andon)."""
        from tasks.process import get_redis

        redis = get_redis()
        raw = self.retry("unacked", lambda: redis.hgetall("unacked"))
        index = dict(self.retry("unacked_index", lambda: redis.zrange("unacked_index", 0, -1, withscores=True)))
        parked = {}
        for tag, payload in raw.items():
            try:
                task_id = json.loads(payload)[0]["headers"]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                continue
            parked[task_id] = datetime.fromtimestamp(index.get(tag, 0), UTC)
        return parked

    def leftover_dirs(self, settle_s: float = 15.0) -> list[str]:
        from db.settings import get_settings

        tmp = get_settings().jobs_tmp_dir
        deadline = time.monotonic() + settle_s
        while True:
            left = sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.25)

    def integrity_errors(self) -> dict[str, str]:
        """Jobs whose item write raised an IntegrityError in a worker (an item written twice: two owners),
        from the worker logs: job id → the first such line."""
        import re

        uuid = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
        bad = re.compile(r"IntegrityError|UNIQUE constraint failed|duplicate key value")
        found: dict[str, str] = {}
        for log in sorted((self.home / "logs").glob("worker-*.log")):
            last_id = None
            for line in log.read_text(errors="replace").splitlines():
                ids = uuid.findall(line)
                if ids:
                    last_id = ids[0]
                if bad.search(line) and last_id and last_id not in found:
                    found[last_id] = f"{log.name}: {line.strip()[:300]}"
        return found

    def worker_errors(self) -> dict[str, str]:
        """The first ERROR line a worker logged naming each job (what a fault made its task raise):
        job id → "log: line", to point a violation at its cause."""
        import re

        task = re.compile(r"ERROR/.*?\[([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\]")
        found: dict[str, str] = {}
        for log in sorted((self.home / "logs").glob("worker-*.log")):
            for line in log.read_text(errors="replace").splitlines():
                m = task.search(line)
                if m and m.group(1) not in found:
                    found[m.group(1)] = f"{log.name}: {line.strip()[:260]}"
        return found

    def results_settled(self) -> dict[str, int]:
        """How many Celery results andon's sweep wrote because the job's run couldn't, per worker log."""
        return {log.name: n for log in sorted((self.home / "logs").glob("worker-*.log"))
                if (n := log.read_text(errors="replace").count("wrote the Celery state of ended job"))}
