"""Phase 2: cancel vs complete — one-item jobs, each cancelled a random moment after its submit."""

from __future__ import annotations

import threading
import time

from chaos.console import fmt_s, now
from chaos.plan import REASONS


class Race:
    """Phase 2: cancel vs complete — one-item jobs, each cancelled a random moment after its submit. Mixed into ``chaos.harness.Harness``, whose state it uses."""

    def run_race(self) -> None:
        if self.plan.race <= 0:
            return
        started = time.monotonic()
        self.mark(f"phase 2: cancel vs complete, {self.plan.race} one-item jobs")
        counts = [self.plan.race // self.plan.race_threads + (i < self.plan.race % self.plan.race_threads)
                  for i in range(self.plan.race_threads)]
        threads = [threading.Thread(target=self._race_thread, args=(n,), daemon=True) for n in counts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=self.plan.budget_s * 0.4)
        self.phase_times["race"] = time.monotonic() - started
        self.wait_terminal(30, "phase 2 drain")
        self.worker_deaths("at the end of phase 2")
        self.mark(f"phase 2 done in {fmt_s(self.phase_times['race'])}")

    def _race_thread(self, n: int) -> None:
        from api import service
        from chaos.checks import Act
        from db.models import Job
        from db.session import session_scope
        from db.vocabulary import CancellationReason, CancellationSource
        from tasks.errors import JobAlreadyTerminal

        deadline = time.monotonic() + self.plan.budget_s * 0.35
        for i in range(n):
            if time.monotonic() > deadline:
                self.note(f"race thread stopped after {i} of {n} jobs: out of time")
                return
            doc = f"Race document {self.rand('randrange', 10**6)}. Short and quick."
            job_id = self.retry("race submit",
                                lambda: service.submit_job([doc], {}, actor="chaos-race").job_id)
            with self.lock:
                self.record.submitted[job_id] = {"phase": "race", "deadline_s": None, "docs": 1}
            roll = self.rand("random")
            if roll < 0.15:
                how = "at once"
            elif roll < 0.65:  # the real race: cancel while it runs, as it is about to complete
                how = "once running"
                until = time.monotonic() + 10
                while time.monotonic() < until:
                    with session_scope() as session:
                        if session.get(Job, job_id).status != "pending":
                            break
                    time.sleep(0.001)
                time.sleep(self.rand("uniform", 0, self.plan.race_max_offset_s))
            else:
                how = "random offset"
                time.sleep(self.rand("uniform", 0, self.plan.race_max_delay_s))
            with self.lock:
                self.record.submitted[job_id]["how"] = how
            reason = self.rand("choice", REASONS)
            act = Act("race_cancel", job_id, now(), reason, "api")
            with self.lock:
                self.record.actions.append(act)
            try:
                service.cancel_job(job_id, CancellationReason(reason), "chaos: race", CancellationSource.API,
                                   actor="chaos-race")
                act.result = "accepted"
            except JobAlreadyTerminal:
                act.result = "terminal"
            until = time.monotonic() + 30
            while time.monotonic() < until:  # one job in flight per thread: the race is with a running job
                with session_scope() as session:
                    status = session.get(Job, job_id).status
                if status in ("cancelled", "completed", "failed"):
                    break
                time.sleep(0.003)
