"""What the chaos run asserts, from the rows alone (jobs, job_items, job_events) plus the API's
partial results and the temp dir: every job ended once, for the reason of the first request that
asked it to stop, with its counts and its results in agreement.

Each rule yields ``(check, job_id, message)``; run.py prints them grouped and exits non-zero if any.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

TERMINAL = {"cancelled", "completed", "failed"}
SHUTDOWN = ("system_shutdown", "worker_shutdown")
DEADLINE = ("timeout", "deadline")
#: README, "Resume": a job cancelled for timeout or system_shutdown is resumable
RESUMABLE = {"timeout", "system_shutdown"}

#: the checks, in the order the report lists them (name → what it means)
CHECKS = {
    "lost": "every submitted job has a row",
    "non-terminal": "every job reached a terminal state (none stuck)",
    "terminal-events": "exactly one terminal job_event per job, matching its status",
    "reason-source": "a cancelled job's reason/source = its first cancel_requested event's",
    "unexpected-request": "every cancel request came from a stop path the harness used on that job",
    "untouched": "a job nothing stopped ended completed",
    "completed-with-reason": "a completed job carries no cancellation reason",
    "failed": "a failed job failed only from being lost twice (SIGKILL)",
    "lost-without-kill": "a job was requeued/lost only when the harness killed its process",
    "duplicate-run": "a job started again only after being requeued",
    "resumable": "a cancelled job is resumable iff its reason is timeout or system_shutdown",
    "item-counts": "completed_items / failed_items = the job_items rows",
    "items-after-cancel": "no item of a cancelled job finished after cancel_observed_at",
    "queued-cancel-ran": "a cancel that ended a job as queued found it queued (not running), and it never ran after",
    "celery-state": "Celery's result backend agrees: completed → SUCCESS, cancelled → REVOKED, failed → FAILURE",
    "partial-results": "GET /api/jobs/{id}/partial-results agrees with the rows",
    "auto-resume": "each job a warm restart stopped was resumed exactly once, keeping its items",
    "temp-dirs": "no directory left under $ANDON_HOME/tmp/jobs/",
    "processes": "no process left behind after the stack stopped",
    "harness": "the harness's own calls succeeded (after retries) and stayed within bounds",
    # issue 11's harsher faults
    "fault-failed": "no harsher fault (Redis pause/down, DB lock/restart, duplicate delivery, lost message) "
                    "ended a job failed",
    "two-owners": "one owner at a time: no second `started` without a requeue/takeover between, no item "
                  "written twice",
    "lost-message": "a job whose queue message was deleted was re-sent (or ended) within the drain",
    "db-unavailable": "a job stopped by a database outage ended cancelled/system_shutdown/database_unavailable, "
                      "resumable",
    "streams": "with 100–200 event streams open the API answered promptly, and released them once closed",
    "worker-died": "no worker main process exited unless the harness stopped it",
    # issue 13: beyond cancel
    "supersede": "a supersede race leaves one job standing (the newest); the others ended cancelled/superseded "
                 "by a job of the same key, and none of them was resumed",
    "idempotency": "one Idempotency-Key, one body: every answer the same job_id, one row; another body: 409, "
                   "no row",
    "policy-resume": "every timeout-cancelled job was resumed by the policy (policy:auto_resume) unless its "
                     "chain held max_resumes policy resumes (then skipped); none resumed twice or otherwise",
}

#: actions that ask a job to stop (or kill it); the others (duplicate delivery, lost message) must not
#: change how a job ends
STOP_KINDS = {"api_cancel", "cli_cancel", "flower_revoke", "flower_terminate", "sigkill", "race_cancel"}
DUP_KINDS = {"dup_send_task", "dup_flower_apply"}
DB_FAULTS = {"db-lock", "pg-restart"}
REDIS_FAULTS = {"redis-pause", "redis-down", "redis-restart"}
DB_UNAVAILABLE = ("system_shutdown", "database_unavailable")
#: event kinds that hand a job from one owner to the next (today `requeued`; a takeover by a new
#: delivery when the owner is dead may get its own kind)
HANDOVER = re.compile(r"requeue|takeover|take_over|taken_over|resent|re_sent|redeliver|reclaim")
#: what a fault may explain: from this long before it began until this long after it ended (a job
#: retrying its database writes for a bounded time, a reaper noticing a missed beat)
FAULT_BEFORE_S = 5.0
FAULT_AFTER_S = 120.0
#: the stream storm's bounds: GET /api/jobs/ID answers within these while streams are open / after —
#: or within STREAMS_SLOWDOWN × its slowest answer just before the streams opened, when the box is so
#: busy that that is longer (a stalled API hangs for the whole hold, or fails: no box excuses that)
STREAMS_DURING_S = 5.0
STREAMS_AFTER_S = 2.0
STREAMS_SLOWDOWN = 3.0
#: threads the API may have gained for good (an executor warms up a fixed pool — seen: +5 or +6 — while
#: a thread held per stream would be +100 and more)
STREAMS_THREAD_SLACK = 10


@dataclass
class Act:
    """One thing the harness did to a job, and what it expects that to mean."""

    kind: str  # api_cancel, cli_cancel, flower_revoke, flower_terminate, sigkill, race_cancel
    job_id: str
    at: datetime
    reason: str | None = None
    source: str | None = None
    result: str = ""  # accepted / terminal / error: ...
    pid: int | None = None


@dataclass
class Record:
    submitted: dict[str, dict[str, Any]] = field(default_factory=dict)  # job_id -> {phase, deadline_s, docs}
    actions: list[Act] = field(default_factory=list)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    redis_restart: tuple[datetime, datetime] | None = None
    #: the harsher faults: {"kind", "began", "ended", ...} (chaos/faults.py)
    faults: list[dict[str, Any]] = field(default_factory=list)
    #: worker main processes that exited on their own: {"worker", "life", "code", "noticed", "log", "why"}
    worker_deaths: list[dict[str, Any]] = field(default_factory=list)
    submit_errors: list[str] = field(default_factory=list)
    transient: Counter = field(default_factory=Counter)
    #: issue 13: supersede key -> the job ids its race's submits answered
    supersedes: dict[str, list[str]] = field(default_factory=dict)
    #: issue 13: one dict per idempotent-retry action (key, tag, answers, other)
    idempotent: list[dict[str, Any]] = field(default_factory=list)


LOST = re.compile(r"worker process lost (\d+) times")


def _node(actor: str | None) -> str | None:
    return actor.split("@", 1)[0] if actor and "@" in actor else None


def windows(record: Record, kinds: set[str]) -> list[tuple[str, datetime, datetime]]:
    found = [(f["kind"], f["began"], f["ended"]) for f in record.faults if f["kind"] in kinds]
    if "redis-restart" in kinds and record.redis_restart:
        found.append(("redis-restart", *record.redis_restart))
    return found


def faults_near(record: Record, at: datetime | None, kinds: set[str] | None = None,
                after_s: float = FAULT_AFTER_S) -> list[str]:
    """The faults whose window (widened) holds ``at``, as "kind began→ended" strings."""
    if at is None:
        return []
    out = []
    for kind, began, ended in windows(record, kinds or (DB_FAULTS | REDIS_FAULTS)):
        if began - timedelta(seconds=FAULT_BEFORE_S) <= at <= ended + timedelta(seconds=after_s):
            distance = max((began - at).total_seconds(), (at - ended).total_seconds(), 0.0)
            out.append((distance, f"{kind} {began.strftime('%H:%M:%S')}→{ended.strftime('%H:%M:%S')}"))
    return [text for _, text in sorted(out)]  # the nearest first (inside its window: distance 0)


def check_streams(record: Record) -> list[tuple[str, str, str]]:
    out = []
    for f in record.faults:
        if f["kind"] != "streams":
            continue
        bad = {k: v for k, v in f["statuses"].items() if k != "200"}
        if bad or f["open_errors"]:
            out.append(("streams", "-", f"of {f['streams']} streams, answered {f['statuses']}, "
                        f"{f['open_errors']} connections refused"))
        busy = STREAMS_SLOWDOWN * f.get("before_max_s", 0.0)  # inf when a probe before failed: no excuse then
        during_bound = max(STREAMS_DURING_S, busy if busy != float("inf") else 0.0)
        after_bound = max(STREAMS_AFTER_S, busy if busy != float("inf") else 0.0)
        if f["during_max_s"] is None or f["during_max_s"] > during_bound:
            out.append(("streams", "-", f"GET /api/jobs/ID took up to {f['during_max_s']}s (or failed) while "
                        f"{f['streams']} streams were open (bound {during_bound:.2f}s; before them "
                        f"{f.get('before_max_s')}s)"))
        if f["after_max_s"] > after_bound:
            out.append(("streams", "-", f"GET /api/jobs/ID took up to {f['after_max_s']}s (or failed) right after "
                        f"the streams were closed (bound {after_bound:.2f}s; before them {f.get('before_max_s')}s)"))
        base, _, after = f["conns"]
        if after > base + 2:
            out.append(("streams", "-", f"API still holds {after} connections 15 s after the streams were "
                        f"closed (baseline {base})"))
        tbase, _, tafter = f["threads"]
        if tafter > tbase + STREAMS_THREAD_SLACK:
            out.append(("streams", "-", f"API process has {tafter} threads 15 s after the streams were closed "
                        f"(baseline {tbase})"))
    return out


def check_rows(record: Record, jobs: list, items: list, events: list, partials: dict[str, dict],
               states: dict[str, str | None], parked: dict[str, datetime] | None = None,
               celery_meta: dict[str, dict] | None = None, slack_s: float = 1.0,
               integrity: dict[str, str] | None = None, worker_errors: dict[str, str] | None = None):
    """Return (violations, info): violations as (check, job_id, message); info as counters for the report.
    ``integrity``: job id → a worker log line where writing its items raised IntegrityError."""
    out: list[tuple[str, str, str]] = check_streams(record)
    for d in record.worker_deaths:
        out.append(("worker-died", "-", f"worker {d['worker']} (life {d['life']}, logs/{d['log']}) exited with code "
                    f"{d['code']}, noticed {d['noticed']}: {d['why'] or 'no CRITICAL line in its log'}"))
    integrity = integrity or {}
    worker_errors = worker_errors or {}
    redis_windows = windows(record, REDIS_FAULTS)
    by_id = {j.id: j for j in jobs}
    items_of: dict[str, list] = defaultdict(list)
    for it in items:
        items_of[it.job_id].append(it)
    events_of: dict[str, list] = defaultdict(list)
    for ev in sorted(events, key=lambda e: e.id):
        events_of[ev.job_id].append(ev)
    acts_of: dict[str, list[Act]] = defaultdict(list)
    for act in record.actions:
        acts_of[act.job_id].append(act)
    kills = sorted((a for a in record.actions if a.kind == "sigkill"), key=lambda a: a.at)
    resumed_by: dict[str, list] = defaultdict(list)
    for j in jobs:
        if j.resumed_from:
            resumed_by[j.resumed_from].append(j)
    slack = timedelta(seconds=slack_s)
    info: dict[str, Counter] = defaultdict(Counter)

    for job_id in record.submitted:
        if job_id not in by_id:
            out.append(("lost", job_id, "submitted (202 from the API) but no row"))

    for job in jobs:
        jid = job.id
        evs = events_of[jid]
        its = items_of[jid]
        acts = acts_of[jid]
        origin = ("submitted" if jid in record.submitted else
                  "auto-resumed" if job.resumed_from else "orphan")
        phase = record.submitted.get(jid, {}).get("phase", origin)
        info["origin"][origin] += 1
        info[f"outcome:{phase}"][(job.status, job.cancellation_reason, job.cancellation_source)
                                 if job.status == "cancelled" else (job.status, None, None)] += 1

        parked_at = (parked or {}).get(jid)
        if parked_at is not None:
            info["parked"][job.status] += 1
        lost_msg = [a for a in acts if a.kind == "lose_message" and a.result == "removed"]
        dups = [a for a in acts if a.kind in DUP_KINDS and a.result == "sent"]
        if job.status not in TERMINAL:
            why = ""
            if origin == "orphan" and any(b - slack <= job.created_at <= e + slack for _, b, e in redis_windows):
                why = "; made during a Redis outage by a submit that answered 5xx, never enqueued"
            if parked_at is not None:
                why += (f"; its message was delivered at {parked_at.isoformat()} and sits in kombu's unacked "
                        "hash (redelivered after the 12 h visibility timeout)")
            if lost_msg:
                out.append(("lost-message", jid, f"still {job.status} after the drain: its queue message was "
                            f"deleted at {lost_msg[0].at.isoformat()} and nothing re-sent it "
                            f"(events: {[e.kind for e in evs]}){why}"))
                continue
            near = faults_near(record, job.created_at) + [f"{a.kind} at {a.at.isoformat()}" for a in dups]
            out.append(("non-terminal", jid, f"{origin} job still {job.status} "
                        f"(events: {[e.kind for e in evs]}){why}"
                        + (f"; faults around it: {near}" if near else "")))
            continue

        if origin == "orphan" and job.status == "failed" and (job.error or "").startswith("could not enqueue"):
            # its submit answered 503 (Redis away) and the row was ended at once: the honest outcome
            info["refused-at-submit"][job.status] += 1
            if [e.kind for e in evs if e.kind in TERMINAL] != ["failed"]:
                out.append(("terminal-events", jid, "refused at submit, yet not exactly one `failed` event"))
            continue

        terminal = [e.kind for e in evs if e.kind in TERMINAL]
        if terminal != [job.status]:
            out.append(("terminal-events", jid, f"status {job.status}, terminal events {terminal}"))

        # -- counts and partial results -------------------------------------------------------------
        done = sorted(i.index for i in its if i.status == "done")
        failed = sorted(i.index for i in its if i.status == "failed")
        if (job.completed_items, job.failed_items) != (len(done), len(failed)):
            out.append(("item-counts", jid, f"row says {job.completed_items} done / {job.failed_items} failed, "
                        f"job_items have {len(done)} / {len(failed)}"))
        partial = partials.get(jid)
        if partial is None:
            out.append(("partial-results", jid, "no answer from GET /partial-results"))
        else:
            want_status = "complete" if job.status == "completed" else ("partial" if done else "empty")
            got = (partial.get("job_status"), partial.get("status"), partial.get("completed_items"),
                   [r.get("index") for r in partial.get("results", [])],
                   sorted(f.get("index") for f in partial.get("failed_items", [])), partial.get("total_items"))
            want = (job.status, want_status, len(done), done, failed, job.total_items)
            if got != want:
                out.append(("partial-results", jid, f"API {got} != rows {want}"))

        state = states.get(jid)
        info["celery-state"][(job.status, state)] += 1
        expected = {"completed": {"SUCCESS"}, "cancelled": {"REVOKED"}, "failed": {"FAILURE"}}[job.status]
        if job.status == "failed" and any(a.kind.startswith("flower") for a in acts):
            expected = expected | {"REVOKED"}  # a revoke of its requeued message after it failed
        if lost_msg and not any(e.kind == "started" for e in evs):
            expected = expected | {None}  # the harness deleted its message: no worker ever saw it
        if state not in expected:
            # andon's sweep (tasks/results.py) writes the row's state where its run couldn't — also
            # over a FAILURE Celery stored for an outage of Redis or the database — so none is excused
            exc_type = (celery_meta or {}).get(jid, {}).get("exc_type")
            note = (f"; its message was delivered at {parked_at.isoformat()} and never acked (parked in "
                    "kombu's unacked hash)" if parked_at is not None else "")
            near = faults_near(record, job.finished_at)
            out.append(("celery-state", jid, f"row {job.status}, Celery result {state}"
                        + (f" ({exc_type})" if exc_type else "") + note
                        + (f"; faults around it: {near}" if near else "")
                        + (f"; {worker_errors[jid]}" if jid in worker_errors else "")))

        # -- who asked it to stop -------------------------------------------------------------------
        requests = [e for e in evs if e.kind == "cancel_requested"]
        allowed: set[tuple[str, str]] = {(a.reason, a.source) for a in acts if a.source}
        for ev in requests:
            pair = (ev.reason, ev.source)
            if pair in allowed:
                continue
            if pair == ("user_requested", "superseded") and job.supersede_key:
                continue  # a newer submit with its supersede_key (check_beyond checks the rest)
            if pair == DEADLINE and job.deadline_s:
                due = job.created_at + timedelta(seconds=job.deadline_s)
                if ev.at >= due - timedelta(seconds=0.05):
                    continue
                out.append(("unexpected-request", jid, f"deadline cancel at {ev.at.isoformat()} before the "
                            f"deadline {due.isoformat()}"))
                continue
            if pair == DB_UNAVAILABLE:
                near = faults_near(record, ev.at, DB_FAULTS)
                if near:
                    info["db-unavailable"][near[0].split(" ")[0]] += 1
                    continue
                out.append(("db-unavailable", jid, f"cancel_requested {pair} at {ev.at.isoformat()} with no "
                            "database fault near that time"))
                continue
            if ev.source == "database_unavailable":
                out.append(("db-unavailable", jid, f"a database outage asked it to stop as {ev.reason} "
                            "(must be system_shutdown)"))
                continue
            if pair == SHUTDOWN:
                node = _node(ev.actor)
                if any(r["worker"] == node and r["began"] - slack <= ev.at <= r["exited"] + slack
                       for r in record.restarts):
                    info["shutdown-requests"][node] += 1
                    continue
                out.append(("unexpected-request", jid, f"worker_shutdown cancel by {ev.actor} at "
                            f"{ev.at.isoformat()} outside any restart of that worker"))
                continue
            out.append(("unexpected-request", jid, f"cancel_requested {pair} by {ev.actor}; the harness sent "
                        f"{sorted(allowed) or 'nothing'}{' (deadline job)' if job.deadline_s else ''}"))

        first = requests[0] if requests else None
        lost_evidence = [(e.kind, e.at) for e in evs if e.kind == "requeued" or (
            e.kind == "cancel_observed" and e.source == "worker_lost")]
        if job.status == "failed" and LOST.search(job.error or ""):
            lost_evidence.append(("failed (lost)", job.finished_at))
        killed_here = [a for a in acts if a.kind == "sigkill"]
        stops = [a for a in acts if a.kind in STOP_KINDS]
        for kind, at in lost_evidence:
            if killed_here:
                break
            redis_near = faults_near(record, at, REDIS_FAULTS, after_s=30)
            if not redis_near and any(at - timedelta(seconds=20) <= k.at <= at + slack for k in kills):
                # (not right after a Redis fault: there a reaper that lost sight of a live job is the
                # likelier story, and the one this run is looking for)
                info["kills"]["collateral (the killed process had moved on to this job)"] += 1
                continue
            near = faults_near(record, at) + [f"{a.kind} at {a.at.isoformat()}" for a in dups]
            out.append(("lost-without-kill", jid, f"{kind} at {at.isoformat()} with no SIGKILL by the "
                        "harness near that time" + (f"; faults around it: {near}" if near else "")))
        reaped = [e for e in evs if e.kind == "cancel_observed" and e.source == "worker_lost"]
        if len(reaped) > 1:
            out.append(("two-owners", jid, f"declared lost {len(reaped)} times by "
                        f"{[(e.actor, e.at.isoformat()) for e in reaped]}"
                        + (f"; faults around it: {faults_near(record, reaped[0].at)}"
                           if faults_near(record, reaped[0].at) else "")))
        requeued = sum(e.kind == "requeued" for e in evs)
        # one owner at a time: between two `started` there must be a handover (requeue/takeover) or a
        # SIGKILL of its process by the harness
        last_start = None
        for ev in evs:
            if HANDOVER.search(ev.kind):
                last_start = None
            elif ev.kind == "started":
                if last_start is not None and not any(last_start.at - slack <= k.at <= ev.at + slack
                                                      for k in killed_here):
                    what = ("two-owners" if dups or faults_near(record, ev.at) else "duplicate-run")
                    near = faults_near(record, ev.at) + [f"{a.kind} at {a.at.isoformat()}" for a in dups]
                    out.append((what, jid, f"started again at {ev.at.isoformat()} by {ev.actor} while the start at "
                                f"{last_start.at.isoformat()} by {last_start.actor} had no requeue/takeover after "
                                f"it; status {job.status}" + (f"; {near}" if near else "")))
                    break
                last_start = ev
        twice = integrity.get(jid) or next((job.error for _ in [0] if job.error and re.search(
            r"IntegrityError|UNIQUE constraint|duplicate key", job.error)), None)
        if twice:
            near = [f"{a.kind} at {a.at.isoformat()}" for a in dups] + faults_near(record, job.finished_at)
            out.append(("two-owners", jid, f"an item written twice (IntegrityError): {twice[:200]}; status "
                        f"{job.status}" + (f"; {near}" if near else "")))

        if job.status == "cancelled":
            if first is None:
                out.append(("reason-source", jid, f"cancelled ({job.cancellation_reason}/"
                            f"{job.cancellation_source}) with no cancel_requested event"))
            elif (job.cancellation_reason, job.cancellation_source) != (first.reason, first.source):
                near = faults_near(record, job.finished_at)
                out.append(("reason-source", jid, f"ended {job.cancellation_reason}/{job.cancellation_source}, "
                            f"first request was {first.reason}/{first.source} by {first.actor}; requests: "
                            f"{[(e.reason, e.source, e.actor) for e in requests]}"
                            + (f"; faults around it: {near}" if near else "")))
            # a job cancelled while queued is never observed at a checkpoint: its request is the bound
            bound = job.cancel_observed_at or job.cancel_requested_at
            if bound is None:
                out.append(("items-after-cancel", jid, "cancelled with neither cancel_observed_at nor "
                            "cancel_requested_at"))
            else:
                late = [i.index for i in its if i.finished_at > bound]
                if late:
                    out.append(("items-after-cancel", jid, f"items {late} finished after the cancel was "
                                f"{'observed' if job.cancel_observed_at else 'requested (queued job)'}"))
            if first is not None and (first.detail or {}).get("status") == "cancelled":
                # the request ended the job as *queued*: it must have been queued (never started, or
                # requeued since its last start), and must not start afterwards
                before = [e for e in evs if e.id < first.id and e.kind in ("started", "requeued")]
                if before and before[-1].kind == "started":
                    out.append(("queued-cancel-ran", jid, f"the {first.reason}/{first.source} request (event "
                                f"{first.id}) ended it as a queued job, but the worker's start (event "
                                f"{before[-1].id}, started_at {job.started_at}) "
                                f"was committed before it; cancel_observed_at {job.cancel_observed_at}, items written "
                                f"after: {[i.index for i in its if i.finished_at > job.finished_at]}"))
                after = [e for e in evs if e.kind == "started" and e.id > first.id]
                if after:
                    out.append(("queued-cancel-ran", jid, "cancelled while queued, started afterwards"))
            if job.resumable != (job.cancellation_reason in RESUMABLE):
                queued = first is not None and (first.detail or {}).get("status") == "cancelled"
                out.append(("resumable", jid, f"cancelled for {job.cancellation_reason} "
                            f"({'queued' if queued else 'running'} when asked), resumable={job.resumable}"))
        elif job.status == "completed":
            if job.cancellation_reason is not None:
                out.append(("completed-with-reason", jid, f"completed, yet cancellation_reason="
                            f"{job.cancellation_reason!r} source={job.cancellation_source!r} "
                            f"(a cancel that lost to completion: {[(e.reason, e.source) for e in requests]})"))
            if job.completed_items + job.failed_items != job.total_items:
                out.append(("item-counts", jid, f"completed with {job.completed_items}+{job.failed_items} of "
                            f"{job.total_items} items"))
            if not requests and not stops and not job.deadline_s:
                info["untouched"]["completed"] += 1
        elif job.status == "failed":
            m = LOST.search(job.error or "")
            near = faults_near(record, job.finished_at) + [f"{a.kind} at {a.at.isoformat()}"
                                                            for a in dups + lost_msg]
            if near and not (m and killed_here):
                out.append(("fault-failed", jid, f"failed: {job.error!r}; faults around it: {near}; events "
                            f"{[(e.kind, e.actor, e.at.strftime('%H:%M:%S.%f')[:12]) for e in evs]}"
                            + (f"; {worker_errors[jid]}" if jid in worker_errors else "")))
            elif not m:
                out.append(("failed", jid, f"failed: {job.error!r}"))
            elif not (killed_here or lost_evidence) or requeued < int(m.group(1)) - 1:
                out.append(("failed", jid, f"{job.error!r} but killed {len(killed_here)}x, requeued {requeued}x"))
            elif requests:
                out.append(("failed", jid, f"{job.error!r} although a cancel had been requested "
                            f"({first.reason}/{first.source}): should end cancelled"))
        if job.status != "completed" and not requests and not stops and not job.deadline_s and not lost_evidence \
                and job.status != "failed":  # a failed one is reported by "failed" / "fault-failed"
            near = faults_near(record, job.finished_at) + [f"{a.kind} at {a.at.isoformat()}" for a in dups + lost_msg]
            out.append(("untouched", jid, f"nothing stopped it, yet it ended {job.status} ({job.error})"
                        + (f"; faults around it: {near}" if near else "")))

        # -- auto-resume after a warm restart -------------------------------------------------------
        if (job.status == "cancelled" and (job.cancellation_reason, job.cancellation_source) == SHUTDOWN
                and first is not None):
            node = _node(first.actor)
            if any(r["worker"] == node for r in record.restarts):
                children = resumed_by.get(jid, [])
                if len(children) != 1:
                    out.append(("auto-resume", jid, f"stopped by the restart of {node}, resumed "
                                f"{len(children)} times"))
                else:
                    info["auto-resume"]["resumed"] += 1
                    child_done = {i.index for i in items_of[children[0].id] if i.status == "done"}
                    if not set(done) <= child_done:
                        out.append(("auto-resume", jid, f"resumed as {children[0].id} without items "
                                    f"{sorted(set(done) - child_done)}"))
        if len(resumed_by.get(jid, [])) > 1:
            out.append(("auto-resume", jid, f"resumed {len(resumed_by[jid])} times"))
    return out, info


def race_summary(record: Record, jobs: list, events: list) -> Counter:
    """How each cancel-vs-complete race came out."""
    race_ids = {j for j, meta in record.submitted.items() if meta.get("phase") == "race"}
    events_of: dict[str, list] = defaultdict(list)
    for ev in sorted(events, key=lambda e: e.id):
        if ev.job_id in race_ids:
            events_of[ev.job_id].append(ev)
    summary: Counter = Counter()
    for job in jobs:
        if job.id not in race_ids:
            continue
        evs = events_of[job.id]
        requests = [e for e in evs if e.kind == "cancel_requested"]
        started = any(e.kind == "started" for e in evs)
        terminal = [e.kind for e in evs if e.kind in TERMINAL]
        summary["jobs"] += 1
        summary[job.status] += 1
        summary[("how", record.submitted[job.id].get("how"), job.status)] += 1
        if len(terminal) > 1:
            summary["two terminal states"] += 1
        if job.status == "cancelled":
            if (requests[0].detail or {}).get("status") == "cancelled" if requests else False:
                summary["cancelled while queued (never ran)"] += 1
            else:
                summary["cancelled while running (at a checkpoint)"] += 1
        elif job.status == "completed":
            if requests:
                summary["completed: the cancel lost to completion"] += 1
            else:
                summary["completed: the cancel came after the end (400)"] += 1
        if not started and job.status != "cancelled":
            summary["ended without starting (unexpected)"] += 1
    return summary


# -- issue 13: supersede races, idempotent retries, policy resumes -----------------------------------

SUPERSEDED_MSG = re.compile(r"superseded by job ([0-9a-f-]{36})")
REFUSED = "could not enqueue"


def _refused(job) -> bool:
    """A row its submit's 5xx answer ended at once (Redis away): the honest outcome, not a job that ran."""
    return job.status == "failed" and (job.error or "").startswith(REFUSED)


def check_beyond(record: Record, jobs: list, events: list, winners: dict[str, str], max_resumes: int,
                 policy_on: bool = True, slack_s: float = 1.0):
    """Supersede races, idempotent retries and policy resumes: (violations, info)."""
    out: list[tuple[str, str, str]] = []
    info: dict[str, Counter] = defaultdict(Counter)
    by_id = {j.id: j for j in jobs}
    events_of: dict[str, list] = defaultdict(list)
    for ev in sorted(events, key=lambda e: e.id):
        events_of[ev.job_id].append(ev)
    children: dict[str, list] = defaultdict(list)
    for j in jobs:
        if j.resumed_from:
            children[j.resumed_from].append(j)
    slack = timedelta(seconds=slack_s)

    def superseded(job) -> bool:
        return job.status == "cancelled" and job.cancellation_source == "superseded"

    # -- supersede races ----------------------------------------------------------------------------
    for key, answered in record.supersedes.items():
        group = [j for j in jobs if j.supersede_key == key]
        ids = {j.id for j in group}
        for jid in answered:
            if jid not in ids:
                out.append(("supersede", jid, f"answered 202 for key {key} but no row carries that key"))
        if not group:
            continue
        info["supersede"]["races"] += 1
        info["supersede"]["jobs"] += len(group)
        winner = winners.get(key)
        if winner not in ids:
            out.append(("supersede", winner or "-", f"key {key}: supersede_keys names {winner}, not one of its "
                        f"jobs {sorted(ids)}"))
        elif superseded(by_id[winner]):
            out.append(("supersede", winner, f"key {key}: the newest job (supersede_keys) was itself superseded: "
                        f"{by_id[winner].cancellation_message!r}"))
        else:
            info["supersede"][f"winner {by_id[winner].status}"] += 1
        standing = []
        for job in group:
            if superseded(job):
                info["supersede"]["superseded"] += 1
                m = SUPERSEDED_MSG.search(job.cancellation_message or "")
                if m is None or m.group(1) not in ids or m.group(1) == job.id:
                    out.append(("supersede", job.id, f"superseded with message {job.cancellation_message!r}, "
                                f"which names no other job of key {key}"))
                if job.resumed_by or children.get(job.id):
                    out.append(("supersede", job.id, f"superseded, yet resumed as "
                                f"{job.resumed_by or [c.id for c in children[job.id]]}"))
                if job.cancellation_reason != "user_requested":
                    out.append(("supersede", job.id, f"superseded with reason {job.cancellation_reason}"))
            elif _refused(job):
                info["supersede"]["refused at submit (5xx, retried)"] += 1
            elif job.id != winner:
                standing.append(job)
        w = by_id.get(winner)
        for job in standing:
            # an older job that had already ended when the newest was submitted has nothing to supersede
            if w is not None and job.finished_at is not None and job.finished_at <= w.created_at + slack:
                info["supersede"]["ended before the newest submit"] += 1
                continue
            out.append(("supersede", job.id, f"key {key}: ended {job.status}"
                        f"{'/' + str(job.cancellation_reason) + '/' + str(job.cancellation_source) if job.status == 'cancelled' else ''}"
                        f" (finished {job.finished_at}), not superseded, while {winner} is the newest "
                        f"(created {w.created_at if w else '?'}); events {[e.kind for e in events_of[job.id]]}"))

    # -- idempotent retries ---------------------------------------------------------------------------
    for entry in record.idempotent:
        key, tag = entry["key"], entry["tag"]
        if not entry["answers"]:
            continue
        info["idempotency"]["actions"] += 1
        first_doc = f"Beyond document {tag}-0."
        # the rows a submit made: a resume of one (after a warm restart, by a policy) has its inputs too
        rows = [j for j in jobs if j.inputs and str(j.inputs[0]).startswith(first_doc) and not j.resumed_from]
        same_rows = [j for j in rows if not str(j.inputs[-1]).endswith(f"{tag}-other.")]
        other_rows = [j for j in rows if j not in same_rows]
        kept = [j for j in same_rows if not _refused(j)]
        answers = entry["answers"]
        statuses = Counter(s for s, _ in answers)
        ids = {p.get("job_id") for s, p in answers if isinstance(p, dict) and s == 202}
        if set(statuses) != {202} or len(ids) != 1:
            out.append(("idempotency", key, f"{len(answers)} same-body requests answered {dict(statuses)} "
                        f"with job ids {sorted(map(str, ids))}"))
        if len(kept) != 1 or (ids and kept and kept[0].id not in ids):
            out.append(("idempotency", key, f"same body: {len(kept)} rows {[j.id for j in kept]} for answered "
                        f"ids {sorted(map(str, ids))}"))
        else:
            info["idempotency"]["one job"] += 1
        if len(same_rows) > len(kept):
            info["idempotency"]["refused at submit (5xx, retried)"] += len(same_rows) - len(kept)
        other = entry.get("other")
        if other is None:
            out.append(("idempotency", key, "the other-body request got no answer"))
        elif other[0] != 409:
            out.append(("idempotency", key, f"the same key with another body answered {other[0]}: {other[1]}"))
        else:
            info["idempotency"]["other body 409"] += 1
        if other_rows:
            out.append(("idempotency", key, f"the other body (409) still made rows {[j.id for j in other_rows]}"))

    # -- policy resumes -------------------------------------------------------------------------------
    def made_by_policy(job) -> bool:
        return any(e.kind == "resumed" and (e.actor or "").startswith("policy:") and
                   not (e.detail or {}).get("skipped") for e in events_of[job.id])

    def chain_policy_resumes(job) -> int:
        count, current, seen = 0, job, set()
        while current is not None and current.id not in seen:
            seen.add(current.id)
            count += made_by_policy(current)
            current = by_id.get(current.resumed_from) if current.resumed_from else None
        return count

    for job in jobs:
        kids = children.get(job.id, [])
        policy_kids = [c for c in kids if made_by_policy(c)]
        skipped = [e for e in events_of[job.id] if e.kind == "resumed" and (e.detail or {}).get("skipped")]
        if len(kids) > 1:
            out.append(("policy-resume", job.id, f"resumed {len(kids)} times: {[c.id for c in kids]}"))
        if policy_kids and (job.status != "cancelled" or job.cancellation_reason != "timeout"
                            or job.cancellation_source == "superseded"):
            out.append(("policy-resume", job.id, f"resumed by policy as {policy_kids[0].id}, yet it ended "
                        f"{job.status}/{job.cancellation_reason}/{job.cancellation_source}"))
        for c in policy_kids:
            ev = next(e for e in events_of[c.id] if e.kind == "resumed")
            if ev.actor != "policy:auto_resume":
                out.append(("policy-resume", c.id, f"resumed event by {ev.actor}, not policy:auto_resume"))
            if job.resumed_by != c.id:
                out.append(("policy-resume", job.id, f"resumed by policy as {c.id}, yet resumed_by={job.resumed_by}"))
        if not policy_on or job.status != "cancelled" or job.cancellation_reason != "timeout":
            continue
        info["policy"]["timeout-cancelled"] += 1
        done = chain_policy_resumes(job)
        if policy_kids:
            info["policy"]["resumed by policy"] += 1
            if skipped:
                out.append(("policy-resume", job.id, f"resumed by policy as {policy_kids[0].id} and also "
                            f"skipped: {skipped[0].detail}"))
            if done >= max_resumes:
                out.append(("policy-resume", job.id, f"its chain already held {done} policy resumes "
                            f"(max {max_resumes}), yet it was resumed again as {policy_kids[0].id}"))
        elif skipped:
            info["policy"]["skipped at the limit"] += 1
            if done < max_resumes:
                out.append(("policy-resume", job.id, f"skipped ({skipped[0].detail}) with only {done} policy "
                            f"resumes on its chain (max {max_resumes})"))
        elif kids:
            info["policy"]["resumed by another hand"] += 1  # e.g. a warm restart's auto-resume won the race
        else:
            near = faults_near(record, job.finished_at)
            out.append(("policy-resume", job.id, f"cancelled for timeout ({job.cancellation_source}) at "
                        f"{job.finished_at}, {done} policy resumes on its chain: neither resumed nor skipped"
                        + (f"; faults around it: {near}" if near else "")))
        info["policy"][f"chain depth {done}"] += 1
    return out, info
