"""Signed webhooks: when a job submitted with a ``callback_url`` reaches its terminal state, andon
POSTs the job object there, signed, and retries with backoff until the receiver says 2xx.

When: :func:`after_commit` is called by :mod:`tasks.lifecycle` for every terminal transition that
won; the delivery is enqueued once that transaction commits (a receiver never hears of an end that
was rolled back). Delivery is a Celery task (:func:`deliver_webhook`) with its own short time
limit, so a slow or dead receiver costs a worker slot at most ``webhook_timeout_s`` per attempt and
never delays the job itself; waits between attempts are broker countdowns, not sleeps.

What a receiver gets::

    POST <callback_url>
    Content-Type: application/json
    X-Andon-Event: job.cancelled | job.completed | job.failed
    X-Andon-Delivery: <uuid, the same for every attempt of one event: dedupe on it>
    X-Andon-Timestamp: <unix seconds of this attempt>
    X-Andon-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" keyed with ANDON_WEBHOOK_SECRET>

    <the job object, as GET /api/jobs/{id} returns it>

A receiver checks the signature over the raw body and rejects old timestamps (replays).

SSRF: a ``callback_url`` is accepted only with ANDON_WEBHOOK_SECRET set and its host (or host:port)
in ANDON_WEBHOOK_HOSTS, http or https only, checked at submit and again at every attempt (the list
may have changed); redirects are never followed. What this can't do: a listed *name* is trusted as
the operator listed it — if its DNS later points inside the network, andon follows it there.

Delivery is at least once: a worker lost mid-attempt redelivers it (``acks_late``), and a receiver
that answered 2xx after our timeout is retried anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from pydantic_core import to_jsonable_python
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from db import jobs as job_rows
from db.models import Job
from db.session import session_scope
from db.settings import Settings, get_settings
from db.vocabulary import EventKind
from tasks.celery_app import app as celery_app
from tasks.errors import InvalidInput

__all__ = [
    "DELIVER_WEBHOOK", "after_commit", "backoff_s", "check_callback_url", "deliver_webhook", "install",
    "job_object", "sign",
]

log = logging.getLogger(__name__)

#: Registered by this name (:func:`install`).
DELIVER_WEBHOOK = "andon.deliver_webhook"
_PENDING = "andon.webhooks.ended"  # session.info key: jobs this transaction ended


# -- at submit, and before every attempt ---------------------------------------------------------------

def _refused(msg: str) -> InvalidInput:
    return InvalidInput([{"loc": ("body", "callback_url"), "msg": msg, "type": "value_error"}])


def check_callback_url(url: str, settings: Settings | None = None) -> str:
    """``url`` if andon may POST to it, else InvalidInput naming ``callback_url`` (a 422)."""
    settings = settings or get_settings()
    if not settings.webhook_secret or not settings.webhook_host_list:
        raise _refused("webhooks are off: set ANDON_WEBHOOK_SECRET and ANDON_WEBHOOK_HOSTS to use callback_url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _refused(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise _refused("only http and https URLs are allowed")
    if not parts.hostname:
        raise _refused("the URL names no host")
    if parts.username is not None or parts.password is not None:
        raise _refused("credentials in the URL are not allowed")
    port = port or (443 if parts.scheme == "https" else 80)
    if not any(_matches(entry, parts.hostname, port) for entry in settings.webhook_host_list):
        raise _refused(f"host {parts.hostname}:{port} is not in ANDON_WEBHOOK_HOSTS")
    return url


def _matches(entry: str, host: str, port: int) -> bool:
    """An ANDON_WEBHOOK_HOSTS entry: ``host`` (any port) or ``host:port``; IPv6 in brackets."""
    if entry.startswith("["):
        want, _, rest = entry[1:].partition("]")
        want_port = rest[1:] if rest.startswith(":") else None
    elif entry.count(":") == 1:
        want, _, want_port = entry.partition(":")
    else:
        want, want_port = entry, None
    return want == host.lower() and (want_port is None or want_port == str(port))


# -- when a job ends ----------------------------------------------------------------------------------

def after_commit(session: Session, job_ids: list[str]) -> None:
    """``job_ids`` reached their terminal state in ``session``'s transaction: once it commits,
    enqueue a delivery for each that has a ``callback_url``. Nothing happens if it rolls back, and
    nothing at all (not even a query) without ANDON_WEBHOOK_SECRET in this process."""
    if not job_ids or not get_settings().webhook_secret:
        return
    pending = session.info.get(_PENDING)
    if pending is None:
        pending = session.info[_PENDING] = []
        event.listen(session, "after_commit", _send_pending)
        event.listen(session, "after_rollback", _forget_pending)
    pending.extend(job_ids)


def _forget_pending(session: Session) -> None:
    session.info.get(_PENDING, []).clear()


def _send_pending(session: Session) -> None:
    job_ids, session.info[_PENDING] = session.info.get(_PENDING, []), []
    if not job_ids:
        return
    try:  # inside the caller's commit(): never raise into it; a lost enqueue is logged
        with session_scope() as own:
            ended = own.execute(select(Job.id, Job.status).where(
                Job.id.in_(job_ids), Job.callback_url.is_not(None))).all()
        for job_id, status in ended:
            send(job_id, f"job.{status}", str(uuid.uuid4()), attempt=1)
    except Exception:
        log.exception("could not enqueue the webhooks of %d ended job(s)", len(job_ids))


def send(job_id: str, event_name: str, delivery_id: str, attempt: int, countdown: float | None = None) -> None:
    queue = get_settings().webhook_queue
    celery_app.send_task(DELIVER_WEBHOOK, args=[job_id, event_name, delivery_id, attempt], countdown=countdown,
                  **({"queue": queue} if queue else {}))


# -- the delivery ------------------------------------------------------------------------------------

def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Andon-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of ``"<timestamp>.<body>"``."""
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def backoff_s(attempt: int, settings: Settings | None = None) -> float:
    """The wait after failed attempt ``attempt`` (1-based): doubling from ``webhook_backoff_s``,
    with ±50 % jitter so receivers coming back aren't hit by every retry at once."""
    base = (settings or get_settings()).webhook_backoff_s * 2 ** (attempt - 1)
    return base * random.uniform(0.5, 1.5)


def job_object(job: Job, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job as ``GET /api/jobs/{id}`` shows it: the one builder, :func:`db.jobs.job_object`."""
    return to_jsonable_python(job_rows.job_object(job, usage))


def deliver_webhook(job_id: str, event_name: str, delivery_id: str, attempt: int = 1) -> dict[str, Any]:
    """One attempt: POST the signed job object; record a ``webhook_attempt`` event; schedule the next
    attempt after a failure, up to ``webhook_max_attempts``. A URL the settings no longer allow is
    recorded as refused and not retried."""
    settings = get_settings()
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or not job.callback_url:
            return {"status": None, "error": "no such job or no callback_url"}
        usage = job_rows.usage_totals(session, job_id)
        url, body = job.callback_url, json.dumps(job_object(job, usage), separators=(",", ":")).encode()
    outcome: dict[str, Any] = {"attempt": attempt, "delivery": delivery_id, "event": event_name, "status": None,
                               "error": None}
    retry = False
    try:
        check_callback_url(url, settings)
    except InvalidInput as exc:
        outcome["error"] = f"refused: {exc.errors[0]['msg']}"
    else:
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": "andon-webhooks",
                   "X-Andon-Event": event_name, "X-Andon-Delivery": delivery_id, "X-Andon-Timestamp": timestamp,
                   "X-Andon-Signature": sign(settings.webhook_secret or "", timestamp, body)}
        started = time.monotonic()
        try:
            answer = httpx.post(url, content=body, headers=headers, timeout=settings.webhook_timeout_s,
                                follow_redirects=False)
            outcome["status"] = answer.status_code
            if not answer.is_success:
                outcome["error"] = f"HTTP {answer.status_code}" + (" (redirects are not followed)"
                                                                   if answer.is_redirect else "")
        except httpx.HTTPError as exc:
            outcome["error"] = f"{type(exc).__name__}: {exc}"[:500]
        except SoftTimeLimitExceeded:  # httpx's timeout is per read: a receiver dripping bytes ends here
            outcome["error"] = "the receiver took longer than the delivery's time limit"

        outcome["elapsed_ms"] = round((time.monotonic() - started) * 1000, 1)
        retry = outcome["error"] is not None and attempt < settings.webhook_max_attempts
    if retry:
        outcome["retry_in_s"] = round(backoff_s(attempt, settings), 3)
    with session_scope() as session:
        job_rows.add_event(session, job_id, EventKind.WEBHOOK_ATTEMPT, actor="webhooks", detail=outcome)
    if retry:
        send(job_id, event_name, delivery_id, attempt + 1, countdown=outcome["retry_in_s"])
    return outcome


def install(app: Celery) -> None:
    """Register the delivery task, with a time limit a little above one attempt's HTTP timeout."""
    timeout = get_settings().webhook_timeout_s
    app.task(name=DELIVER_WEBHOOK, time_limit=timeout + 10, soft_time_limit=timeout + 5,
             acks_late=True)(deliver_webhook)
