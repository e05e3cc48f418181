"""The harsher faults (issue 11): long Redis pauses and outages, a database write lock held past the
busy timeout, a Postgres restart, duplicate deliveries of running jobs, lost queue messages, and a
storm of event streams.

Each fault draws from its own ``random.Random`` seeded from the run's seed and the fault's name, so its
durations and targets replay for a seed whatever else the run did. Everything stays on 127.0.0.1, every
wait is bounded, and each fault is recorded (kind, window, detail) *before* the checks read the rows:
chaos/checks.py uses the windows to tell which stop paths and failures a fault may explain.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import time
import traceback
from typing import Any

from chaos.console import fmt_s, now

#: the kombu Redis transport's lists for one queue (priority steps 0, 3, 6, 9)
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


class Faults:
    """Mixed into ``chaos.harness.Harness``, whose state it uses."""

    def fault_rng(self, name: str) -> random.Random:
        """One generator per fault, from the run's seed and the fault's name."""
        with self.lock:
            rngs = self.__dict__.setdefault("_fault_rngs", {})
            if name not in rngs:
                rngs[name] = random.Random(f"{self.seed}/{name}")
            return rngs[name]

    def frand(self, name: str, fn: str, *args):
        rng = self.fault_rng(name)
        with self.lock:
            return getattr(rng, fn)(*args)

    def record_fault(self, kind: str, began, ended, **detail: Any) -> dict:
        fault = {"kind": kind, "began": began, "ended": ended, **detail}
        with self.lock:
            self.record.faults.append(fault)
        return fault

    def running_count(self) -> int:
        with self.lock:
            return sum(1 for s in self.active.values() if s == "running")

    def queued_count(self) -> int:
        with self.lock:
            return sum(1 for j, s in self.active.items() if s == "pending" and j in self.record.submitted)

    # -- phases: Redis ---------------------------------------------------------------------------------

    def redis_pause(self) -> None:
        lo, hi = self.plan.redis_pause_s
        seconds = round(self.frand("redis-pause", "uniform", lo, hi), 1)
        running, queued = self.running_count(), self.queued_count()
        self.mark(f"Redis paused (SIGSTOP) for {seconds}s; {running} jobs running, {queued} queued")
        self.redis_down.set()
        self.hold_submits.set()
        try:
            began, ended = self.stack.pause_redis(seconds)
        finally:
            self.redis_down.clear()
            self.hold_submits.clear()
        self.record_fault("redis-pause", began, ended, seconds=seconds, running=running, queued=queued)
        self.mark(f"Redis resumed (SIGCONT) after {(ended - began).total_seconds():.1f}s")

    def redis_outage(self) -> None:
        lo, hi = self.plan.redis_outage_s
        seconds = round(self.frand("redis-down", "uniform", lo, hi), 1)
        running, queued = self.running_count(), self.queued_count()
        self.mark(f"Redis down (SIGTERM, restarted on the same port and dir after {seconds}s); "
                  f"{running} jobs running, {queued} queued")
        self.redis_down.set()
        self.hold_submits.set()
        try:
            began, ended = self.stack.restart_redis(seconds)
        finally:
            self.redis_down.clear()
            self.hold_submits.clear()
        self.record_fault("redis-down", began, ended, seconds=seconds, running=running, queued=queued)
        self.mark(f"Redis back after {(ended - began).total_seconds():.1f}s")

    # -- phases: the database --------------------------------------------------------------------------

    def db_lock(self) -> None:
        lo, hi = self.plan.db_lock_s
        seconds = round(self.frand("db-lock", "uniform", lo, hi), 1)
        running, queued = self.running_count(), self.queued_count()
        how = "BEGIN IMMEDIATE on the SQLite file" if self.db == "sqlite" else "LOCK TABLE ... IN EXCLUSIVE MODE"
        self.mark(f"database write lock ({how}) held {seconds}s by another process; {running} running, "
                  f"{queued} queued")
        began, ended = self.stack.hold_db_lock(seconds, self.database_url)
        self.record_fault("db-lock", began, ended, seconds=seconds, running=running, queued=queued, how=how)
        self.mark(f"database lock released after {(ended - began).total_seconds():.1f}s")

    def pg_restart(self) -> None:
        if self.pg is None:
            return
        running, queued = self.running_count(), self.queued_count()
        self.mark(f"Postgres restart (pg_ctl restart -m fast); {running} running, {queued} queued")
        began = now()
        # -l: the new postmaster must not inherit (and hold open) the pipe pg_ctl's output is read from
        done = self.pg._run("pg_ctl", "-D", str(self.pg.data_dir), "-l", str(self.pg.logfile), "-m", "fast",
                            "-w", "-t", "60", "restart", check=False)
        ended = now()
        if done.returncode != 0:
            self.note(f"pg_ctl restart exited {done.returncode}: {done.stderr.strip()[:300]}")
        self.record_fault("pg-restart", began, ended, running=running, queued=queued)
        self.mark(f"Postgres back after {(ended - began).total_seconds():.1f}s")

    # -- phase: many open event streams ----------------------------------------------------------------

    def stream_storm(self) -> None:
        """Open N raw ``GET /api/jobs/{id}/events`` connections, hold them while probing the API, close
        them all abruptly (RST), then probe again and count the API's connections."""
        import psutil

        lo, hi = self.plan.streams
        n = self.frand("streams", "randint", lo, hi)
        hold = round(self.frand("streams", "uniform", 6, 10), 1)
        # a job's stream ends with the job: two long "anchor" jobs (no harness action targets them) keep
        # the streams open for the whole hold, queued or running
        pool = [self.submit_one(phase="anchor", docs=12, delay=0.5) for _ in range(2)]
        targets = [self.frand("streams", "choice", pool) for _ in range(n)]
        api_pid = self.stack.api.pid
        port = self.stack.api_port

        def api_conns() -> int:
            try:
                procs = [psutil.Process(api_pid), *psutil.Process(api_pid).children(recursive=True)]
                return sum(1 for p in procs for c in p.net_connections(kind="tcp")
                           if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)
            except psutil.Error:
                return -1

        def threads() -> int:
            try:
                return psutil.Process(api_pid).num_threads()
            except psutil.Error:
                return -1

        probe_id = targets[0]

        def probe() -> float:
            t0 = time.monotonic()
            try:
                answer = self.httpx.get(f"{self.stack.api_url}/api/jobs/{probe_id}", timeout=15)
                ok = answer.status_code == 200
            except self.httpx.HTTPError:
                ok = False
            took = time.monotonic() - t0
            return took if ok else float("inf")

        base_conns, base_threads = api_conns(), threads()
        before = []  # how fast the API answers on this box right now, before any stream is open
        for _ in range(5):
            before.append(probe())
            time.sleep(0.1)
        began = now()
        self.mark(f"stream storm: opening {n} GET /api/jobs/ID/events streams, held {hold}s")
        socks: list[socket.socket] = []
        statuses: dict[str, int] = {}
        open_errors = 0
        for job_id in targets:
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(f"GET /api/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                          f"Accept: text/event-stream\r\n\r\n".encode())
                socks.append(s)
            except OSError:
                open_errors += 1
        for s in socks:  # read each one's status line (bounded)
            try:
                s.settimeout(3)
                head = s.recv(64).decode("latin-1", "replace")
                code = head.split(" ", 2)[1] if head.startswith("HTTP/") else "no answer"
            except (OSError, IndexError):
                code = "no answer"
            statuses[code] = statuses.get(code, 0) + 1
        during: list[float] = []
        until = time.monotonic() + hold
        while time.monotonic() < until:
            during.append(probe())
            time.sleep(0.3)
        open_conns, open_threads = api_conns(), threads()
        for s in socks:  # abruptly: SO_LINGER 0 sends a RST, no FIN handshake
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            except OSError:
                pass
        closed = now()
        after: list[float] = []
        for _ in range(10):  # at once: a closed stream must not keep the API busy
            after.append(probe())
            time.sleep(0.1)
        # what the API still holds for them (idle worker threads leave after ~10 s: wait that long)
        settle_until = time.monotonic() + 15
        conns_after, threads_after = api_conns(), threads()
        while time.monotonic() < settle_until and (conns_after > base_conns + 2 or threads_after > base_threads + 10):
            time.sleep(0.5)
            conns_after, threads_after = api_conns(), threads()
        result = {"streams": n, "hold_s": hold, "statuses": statuses, "open_errors": open_errors,
                  "before_max_s": max(before),
                  "during_max_s": max(during) if during else None, "during_n": len(during),
                  "after_max_s": max(after), "conns": [base_conns, open_conns, conns_after],
                  "threads": [base_threads, open_threads, threads_after], "closed": closed.isoformat()}
        self.record_fault("streams", began, now(), **result)
        self.mark(f"stream storm: statuses {statuses}, GET /api/jobs/ID took ≤{result['before_max_s']:.2f}s before, "
                  f"≤{result['during_max_s']:.2f}s while open, ≤{result['after_max_s']:.2f}s after; "
                  f"API connections {result['conns']}, "
                  f"threads {result['threads']}")

    # -- weighted actions ------------------------------------------------------------------------------

    def _running_target(self, name: str) -> str | None:
        """A running job with much work left (of the three with the most), so that the second delivery
        — queued behind the others — reaches a worker while the first still runs."""
        from sqlalchemy import select

        from db.models import Job
        from db.session import session_scope

        with self.lock:
            running = sorted(j for j, s in self.active.items()
                             if s == "running" and self.record.submitted.get(j, {}).get("phase") == "chaos"
                             and j not in self.protected)
        if not running:
            return None
        try:
            with session_scope() as session:
                rows = session.execute(select(Job.id, Job.total_items, Job.completed_items, Job.options)
                                       .where(Job.id.in_(running), Job.status == "running")).all()
        except Exception:
            return None
        left = {j: (total - done) * float((options or {}).get("stage_delay_s") or 0)
                for j, total, done, options in rows}
        longest = sorted(left, key=lambda j: (-left[j], j))[:3]
        return self.frand(name, "choice", longest) if longest else None

    def duplicate_delivery(self, kind: str) -> None:
        """Deliver a running job's own message again: ``send_task`` with its id, or Flower's apply."""
        from chaos.checks import Act

        if self.redis_down.is_set():
            return
        job_id = self._running_target(kind)
        if job_id is None:
            return
        act = Act(kind, job_id, now())
        with self.lock:
            self.record.actions.append(act)
        try:
            if kind == "dup_send_task":
                from tasks.app import app

                app.send_task("andon.run_pipeline", args=[job_id], task_id=job_id)
                act.result = "sent"
            else:
                answer = self.client().post(f"{self.stack.flower_url}/api/task/async-apply/andon.run_pipeline",
                                            json={"args": [job_id], "task_id": job_id}, auth=self.flower_auth)
                act.result = "sent" if answer.status_code == 200 else f"error: flower {answer.status_code}"
        except Exception as exc:
            act.result = f"error: {type(exc).__name__}: {exc}"

    def lose_message(self) -> None:
        """Delete a queued job's message from the broker list: its row stays pending with no message."""
        from chaos.checks import Act
        from tasks.process import get_redis

        if self.redis_down.is_set():
            return
        with self.lock:
            queued = sorted(j for j, s in self.active.items()
                            if s == "pending" and self.record.submitted.get(j, {}).get("phase") == "chaos"
                            and j not in self.protected)
        if not queued:
            return
        redis = get_redis()
        try:
            by_id: dict[str, tuple[str, bytes]] = {}
            for suffix in PRIORITY_SUFFIXES:
                name = "andon" + suffix
                for raw in redis.lrange(name, 0, -1):
                    try:
                        task_id = json.loads(raw)["headers"]["id"]
                    except (ValueError, KeyError, TypeError):
                        continue
                    by_id[task_id] = (name, raw)
        except Exception:
            return
        candidates = [j for j in queued if j in by_id]
        if not candidates:
            return
        job_id = self.frand("lose_message", "choice", candidates)
        act = Act("lose_message", job_id, now())
        with self.lock:
            self.record.actions.append(act)
            self.protected.add(job_id)  # before the LREM: no action may end it meanwhile
        name, raw = by_id[job_id]
        try:
            removed = redis.lrem(name, 1, raw)
            act.result = "removed" if removed else "gone (taken by a worker first)"
        except Exception as exc:
            act.result = f"error: {type(exc).__name__}: {exc}"

    def run_fault(self, what: str) -> None:
        try:
            {"redis-pause": self.redis_pause, "redis-down": self.redis_outage, "db-lock": self.db_lock,
             "pg-restart": self.pg_restart, "streams": self.stream_storm}[what]()
        except Exception as exc:
            self.note(f"fault {what} failed: {exc}\n{traceback.format_exc()}")

    def fault_lines(self) -> list[str]:
        lines = []
        for f in self.record.faults:
            took = fmt_s((f["ended"] - f["began"]).total_seconds())
            if f["kind"] == "streams":
                lines.append(f"    stream storm: {f['streams']} event streams held {f['hold_s']}s, answered "
                             f"{f['statuses']} ({f['open_errors']} refused); GET /api/jobs/ID ≤"
                             f"{f['during_max_s']:.2f}s while open ({f['during_n']} probes), ≤{f['after_max_s']:.2f}s "
                             f"after; API connections {f['conns'][0]}→{f['conns'][1]}→{f['conns'][2]}, threads "
                             f"{f['threads'][0]}→{f['threads'][1]}→{f['threads'][2]}")
            else:
                extra = f" ({f['how']})" if f.get("how") else ""
                lines.append(f"    {f['kind']}{extra}: {took}, with {f.get('running', '?')} jobs running and "
                             f"{f.get('queued', '?')} queued")
        return lines
