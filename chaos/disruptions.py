"""Phase 1's disruptions: warm worker restarts (same node name) and a Redis restart, at set shares of
the submits."""

from __future__ import annotations

import time
import traceback


class Disruptions:
    """Phase 1's disruptions: warm worker restarts (same node name) and a Redis restart, at set shares of Mixed into ``chaos.harness.Harness``, whose state it uses."""

    def disruption_gate(self, n: int) -> bool:
        """May the submitter send job number ``n``? Not past a disruption's share while an earlier one
        still runs: each fault lands with jobs running and queued, not after the last submit."""
        targets = [int(self.plan.jobs * share) for share, _ in self.plan.disruptions]
        return all(self.disruptions_done[j - 1].is_set() for j, t in enumerate(targets) if j and n >= t)

    def disruptor(self) -> None:
        try:
            self._disrupt()
        finally:
            for done in self.disruptions_done:  # never leave the submitter gated
                done.set()

    def _disrupt(self) -> None:
        for i, (share, what) in enumerate(self.plan.disruptions):
            target = int(self.plan.jobs * share)
            deadline = time.monotonic() + self.plan.budget_s * 0.5
            while len(self.submitted("chaos")) < target and time.monotonic() < deadline:
                time.sleep(0.1)
            # only disrupt while something runs, so the disruption lands on jobs; the harsher faults also
            # wait (bounded) for the submitter to refill the queue after the previous fault
            until = time.monotonic() + (0 if what == "redis" else 10)
            while time.monotonic() < until and not any(s == "running" for s in dict(self.active).values()):
                time.sleep(0.05)
            if not what.startswith("restart:") and what != "redis":
                until = time.monotonic() + 15
                while time.monotonic() < until and not (self.running_count() >= 2 and self.queued_count() >= 1):
                    time.sleep(0.05)
            try:
                if what == "redis":
                    self.restart_redis()
                elif what.startswith("restart:"):
                    self.restart_worker(what.split(":", 1)[1])
                else:
                    self.run_fault(what)
            except Exception as exc:
                self.note(f"disruption {what} failed: {exc}\n{traceback.format_exc()}")
            self.disruptions_done[i].set()

    def worker_deaths(self, when: str) -> None:
        """Record every worker main process that exited on its own (the harness only ever stops one
        with SIGTERM in a warm restart), with the worker log's CRITICAL line if there is one."""
        for worker in self.stack.workers:
            if worker.proc is None or worker.proc.poll() is None or worker.proc.pid in self.reported_deaths:
                continue
            self.reported_deaths.add(worker.proc.pid)
            why = ""
            try:
                for line in worker.log.read_text(errors="replace").splitlines():
                    if "CRITICAL" in line or "Unrecoverable error" in line:
                        why = line.strip()[:300]
                        break
            except OSError:
                pass
            with self.lock:
                self.record.worker_deaths.append({"worker": worker.name, "life": worker.starts,
                                                  "code": worker.proc.returncode, "noticed": when,
                                                  "log": worker.log.name, "why": why})
            self.mark(f"worker {worker.name} (life {worker.starts}) had exited on its own with code "
                      f"{worker.proc.returncode}, noticed {when}: {why or 'no CRITICAL line in its log'}")

    def restart_worker(self, name: str) -> None:
        self.worker_deaths(f"before the warm restart of {name}")
        worker = next(w for w in self.stack.workers if w.name == name)
        dead_before = worker.proc is not None and worker.proc.poll() is not None  # reported as worker-died
        with self.lock:
            running = sum(1 for s in self.active.values() if s == "running")
            self.restarting.add(name)
        try:
            info = self.stack.restart_worker(worker)
        finally:
            with self.lock:
                self.restarting.discard(name)
        info["share"] = len(self.submitted("chaos")) / self.plan.jobs
        with self.lock:
            self.record.restarts.append(info)
        if not info["warm"]:
            self.note(f"worker {name} did not exit within 60s of SIGTERM (killed)")
        if info["exit_code"] not in (0, None) and not dead_before:
            self.note(f"worker {name} exited with code {info['exit_code']} on a warm shutdown")
        if info["group_left_behind"]:
            self.note(f"worker {name}'s process group outlived its warm shutdown")
        self.mark(f"warm restart of {name}: exited in {info['exit_s']:.1f}s (code {info['exit_code']}), "
                  f"ready again after {(info['ready'] - info['began']).total_seconds():.1f}s "
                  f"({running} jobs were running on the stack)")

    def restart_redis(self) -> None:
        self.redis_down.set()
        try:
            down, up = self.stack.restart_redis(self.plan.redis_down_s)
        finally:
            self.redis_down.clear()
        with self.lock:
            self.record.redis_restart = (down, up)
        self.mark(f"Redis restarted (SIGTERM, same port and data dir): down {(up - down).total_seconds():.1f}s")
