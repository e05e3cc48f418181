"""Baselines for the benchmark: the same pipeline as plain Celery tasks, on andon's own app.

Loaded into the benchmark's worker with ``--include bench.bare``, so both sides run on the same
worker, the same pool, the same broker and backend and the same Celery settings (acks_late,
prefetch 1, task events, track_started). What differs is only what the issue compares:

* ``bench.bare_pipeline`` — the same stages (``tasks.stages``: parse → embed → analyze_local) on the
  same documents, with no token, no job row, no per-item commit: it returns the results list.
* ``bench.abortable_pipeline`` — the same loop as an ``AbortableTask`` that checks
  ``self.is_aborted()`` before every stage, which is how plain Celery stops a running task.
"""

from __future__ import annotations

import time
from typing import Any

from celery.contrib.abortable import AbortableTask

from tasks import stages
from tasks.app import app
from tasks.process import get_redis

STAGES = (stages.parse, stages.embed, stages.analyze_local)


def progress_key(task_id: str) -> str:
    """Items the abortable baseline has finished (a Redis key, so no state update races an abort)."""
    return f"bench:done:{task_id}"


@app.task(name="bench.bare_pipeline")
def bare_pipeline(documents: list[str], stage_delay_s: float = 0.0) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for document in documents:
        value: Any = document
        try:
            for stage in STAGES:
                if stage_delay_s:
                    time.sleep(stage_delay_s)
                value = stage(value)
        except Exception as exc:  # same contract as andon: a failed item is recorded, the job goes on
            results.append({"error": f"{type(exc).__name__}: {exc}"})
            continue
        results.append(value)
    return results


@app.task(name="bench.abortable_pipeline", bind=True, base=AbortableTask)
def abortable_pipeline(self, documents: list[str], stage_delay_s: float = 0.0) -> dict[str, Any]:
    redis = get_redis()
    key = progress_key(self.request.id)
    for index, document in enumerate(documents):
        value: Any = document
        for stage in STAGES:
            if self.is_aborted():  # the checkpoint: one result-backend read
                return {"aborted": True, "observed_at": time.time(), "item": index}
            if stage_delay_s:
                time.sleep(stage_delay_s)  # AbortableTask can't be woken: the sleep runs out first
            value = stage(value)
        redis.set(key, index + 1, ex=3600)
    return {"aborted": False, "observed_at": None, "item": len(documents)}
