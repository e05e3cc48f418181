"""The Celery task: thin. It takes a job id, the pipeline does the rest.

Registered by a stable name so other services can enqueue without importing andon::

    app.send_task("andon.analyze_documents", kwargs={"documents": ["...", "..."]})

(the job row is then created from the task id), or, for a job made through the API,
``send_task("andon.analyze_documents", args=[job_id], task_id=job_id)``.
"""

from __future__ import annotations

from typing import Any

from db import jobs as job_rows
from db.models import Job
from db.session import session_scope
from tasks.app import app
from tasks.pipeline import run_job

TASK_NAME = "andon.analyze_documents"


@app.task(name=TASK_NAME, bind=True)
def analyze_documents(
    self, job_id: str | None = None, documents: list[str] | None = None, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    job_id = job_id or self.request.id
    if documents is not None:
        with session_scope() as session:
            if session.get(Job, job_id) is None:
                job_rows.create_job(session, job_id, documents, options or {}, actor="send_task")
    return run_job(job_id).as_dict()
