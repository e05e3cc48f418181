"""Phase 1's actions: random cancels through the API, the CLI and Flower (Revoke, Terminate), and
SIGKILLs of the pool child running a job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from chaos.console import now
from chaos.errors import Transient
from chaos.plan import REASONS
from chaos.procs import ROOT

#: How long one `andon cancel` process may take, start included (a fresh Python process on a busy box).
CLI_TIMEOUT_S = 180.0


class Actions:
    """Phase 1's actions: random cancels through the API, the CLI and Flower (Revoke, Terminate), and Mixed into ``chaos.harness.Harness``, whose state it uses."""

    def acted_on(self) -> set[str]:
        with self.lock:
            return {a.job_id for a in self.record.actions}

    def pick_cancel_target(self) -> str | None:
        with self.lock:
            ours = {j: s for j, s in self.active.items()
                    if self.record.submitted.get(j, {}).get("phase") == "chaos" and j not in self.protected}
        if not ours:
            return None
        acted = self.acted_on()
        running = [j for j, s in ours.items() if s == "running"]
        again = [j for j in ours if j in acted]
        roll = self.rand("random")
        if again and roll < 0.15:
            pool = again  # a second stop path on a job already asked to stop: first cancel must win
        elif running and roll < 0.85:
            pool = running
        else:
            pool = list(ours)
        return self.rand("choice", sorted(pool))

    def pick_long_target(self) -> str | None:
        """A job that will still be running in a second or two (the CLI takes that long to start)."""
        from sqlalchemy import select

        from db.models import Job
        from db.session import session_scope

        with self.lock:
            ours = [j for j in self.active
                    if self.record.submitted.get(j, {}).get("phase") == "chaos" and j not in self.protected]
        if not ours:
            return None
        def read():
            with session_scope() as session:
                return session.execute(select(Job.id, Job.status, Job.total_items, Job.completed_items,
                                              Job.options).where(Job.id.in_(ours))).all()

        rows = self.retry("pick a long target", read)  # the database may be restarting (the Postgres phase)
        left = {j: (total - done) * 3 * float((options or {}).get("stage_delay_s") or 0) + (
                    2.0 if status == "pending" else 0.0)
                for j, status, total, done, options in rows if status in ("pending", "running")}
        if not left:
            return None
        longest = sorted(left, key=left.get, reverse=True)[:3]
        return self.rand("choice", sorted(longest))

    def act(self, kind: str) -> None:
        if kind == "nothing":
            return
        if kind == "sigkill":
            return self.sigkill()
        if kind in ("dup_send_task", "dup_flower_apply"):
            return self.duplicate_delivery(kind)
        if kind == "lose_message":
            return self.lose_message()
        if kind in ("supersede_race", "idem_retry"):  # chaos/beyond.py (issue 13)
            return getattr(self, kind)()
        job_id = self.pick_long_target() if kind == "cli_cancel" else self.pick_cancel_target()
        if job_id is None:
            return
        from chaos.checks import Act

        if kind == "api_cancel":
            reason = self.rand("choice", REASONS)
            act = Act(kind, job_id, now(), reason, "api")
        elif kind == "cli_cancel":
            reason = self.rand("choice", REASONS)
            act = Act(kind, job_id, now(), reason, "cli")
        else:
            act = Act(kind, job_id, now(), "user_requested", "revoke")
        with self.lock:
            self.record.actions.append(act)  # recorded before it is sent: the job may see it at once
        try:
            act.result = getattr(self, f"do_{kind}")(job_id, act.reason)
        except Exception as exc:
            act.result = f"error: {exc}"
            self.note(f"{kind} on {job_id} failed: {exc}")

    def do_api_cancel(self, job_id: str, reason: str) -> str:
        def post():
            answer = self.client().post(f"{self.stack.api_url}/api/jobs/{job_id}/cancel",
                                        json={"reason": reason, "message": "chaos: api"})
            if answer.status_code >= 500:
                raise Transient(f"cancel answered {answer.status_code}")
            return answer

        answer = self.retry("api cancel", post)
        if answer.status_code == 202:
            return "accepted"
        if answer.status_code == 400 and "already" in answer.text:
            return "terminal"
        raise RuntimeError(f"cancel answered {answer.status_code}: {answer.text[:200]}")

    def do_cli_cancel(self, job_id: str, reason: str) -> str:
        # a fresh `andon` process: on the shared box under load its start alone took ~60 s once (imports
        # stalled on a thrashing disk, 1.7 s of CPU), so 90 s was the box's bound, not andon's
        def run():
            done = subprocess.run([*self.cli, "cancel", job_id, "--reason", reason, "--message", "chaos: cli"],
                                  capture_output=True, text=True, timeout=CLI_TIMEOUT_S, cwd=str(ROOT),
                                  env={**os.environ, "ANDON_API_URL": self.stack.api_url})  # the CLI speaks HTTP
            if done.returncode == 0:
                return "accepted"
            if "already" in done.stderr:
                return "terminal"
            if any(why in done.stderr for why in ("cannot reach Redis", "database error", "cannot reach the API",
                                                  "(HTTP 5")):
                raise Transient(done.stderr.strip()[:200])
            raise RuntimeError(f"andon cancel exited {done.returncode}: {done.stderr.strip()[:300]}")

        return self.retry("cli cancel", run, timeout=CLI_TIMEOUT_S)

    def _flower_revoke(self, job_id: str, terminate: bool) -> str:
        def post():
            answer = self.client().post(f"{self.stack.flower_url}/api/task/revoke/{job_id}",
                                        data={"terminate": "true" if terminate else "false", "signal": "SIGTERM"},
                                        auth=self.flower_auth)
            if answer.status_code != 200:
                raise Transient(f"flower revoke answered {answer.status_code}")
            return "accepted"

        return self.retry("flower revoke", post)

    def do_flower_revoke(self, job_id: str, _reason: str) -> str:
        return self._flower_revoke(job_id, terminate=False)

    def do_flower_terminate(self, job_id: str, _reason: str) -> str:
        return self._flower_revoke(job_id, terminate=True)

    def sigkill(self) -> None:
        """SIGKILL the pool child running a job (its heartbeat names the pid)."""
        from chaos.checks import Act
        from tasks.cancellation.keys import heartbeat_key
        from tasks.process import get_redis

        if self.redis_down.is_set():
            return
        with self.lock:
            running = [j for j, s in self.active.items() if s == "running" and j not in self.protected]
            killed = Counter(a.job_id for a in self.record.actions if a.kind == "sigkill")
        if not running:
            return
        children = {}
        for worker in self.stack.workers:
            if worker.name in self.restarting or not worker.alive():
                continue
            for pid in worker.children():
                children[pid] = worker.name
        try:
            beats = get_redis().mget([heartbeat_key(j) for j in running])
        except Exception:
            return
        pids = {}
        for job_id, beat in zip(running, beats):
            if beat is None:
                continue
            pid = json.loads(beat).get("pid")
            if pid in children and killed[job_id] < 2:
                pids[job_id] = pid
        if not pids:
            return
        twice = [j for j in pids if killed[j] == 1]
        pool = twice if twice and self.rand("random") < 0.5 else sorted(pids)
        job_id = self.rand("choice", sorted(pool))
        act = Act("sigkill", job_id, now(), pid=pids[job_id])
        with self.lock:
            self.record.actions.append(act)
        try:
            os.kill(pids[job_id], signal.SIGKILL)
            act.result = f"killed pid {pids[job_id]} of {children[pids[job_id]]}"
        except ProcessLookupError:
            act.result = "pid gone"

    def actor(self, pool: ThreadPoolExecutor) -> None:
        kinds, weights = zip(*self.plan.weights)
        busy: list = []
        while not self.stop_actions.is_set():
            self.stop_actions.wait(self.plan.action_every_s * self.rand("uniform", 0.5, 1.5))
            busy = [f for f in busy if not f.done()]
            if len(busy) >= 6:
                continue  # don't pile up calls during an outage
            kind = self.rand("choices", kinds, weights)[0]
            busy.append(pool.submit(self._guarded, kind))

    def _guarded(self, kind: str) -> None:
        from sqlalchemy.exc import OperationalError

        try:
            self.act(kind)
        except OperationalError as exc:  # picking a target reads the database, which a fault may hold
            with self.lock:
                self.record.transient[f"{kind} target: {type(exc).__name__}"] += 1
        except Exception:
            self.note(f"action {kind} crashed:\n{traceback.format_exc()}")
