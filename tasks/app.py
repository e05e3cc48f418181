"""The Celery app: ``celery -A tasks.app worker`` / ``celery -A tasks.app flower``.

Settings follow DESIGN.md: JSON only; ``acks_late`` with ``prefetch_multiplier=1`` so a worker holds
at most the job it runs; broker ``visibility_timeout`` far above any hard time limit so a long job is
never redelivered while it still runs; task events on so Flower sees every job.
"""

from __future__ import annotations

from celery import Celery

from db.settings import get_settings
from tasks import notify

#: Comfortably above any job's hard time limit (kombu's Redis transport redelivers unacked messages
#: after this long: https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/redis.html).
VISIBILITY_TIMEOUT_S = 12 * 3600


def make_app() -> Celery:
    settings = get_settings()
    celery = Celery("andon")
    hard = settings.job_time_limit_s
    celery.conf.update(
        broker_url=settings.resolved_broker_url,
        result_backend=settings.resolved_redis_url,
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": max(VISIBILITY_TIMEOUT_S, int((hard or 0) * 2))},
        result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        task_time_limit=hard,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        result_extended=True,
        result_expires=7 * 24 * 3600,
        task_default_queue="andon",
        # cold shutdown (SIGQUIT): Celery waits this long before SIGTERMing the children; our SIGQUIT
        # hook has cancelled their tokens, so they use it to stop at a checkpoint (tasks/signals.py)
        worker_soft_shutdown_timeout=settings.cold_shutdown_grace_s,
        imports=["tasks.jobs", "tasks.signals"],
    )
    return celery


app = make_app()
notify.install()  # every job event and item row this worker commits wakes the API's event streams
