"""The harness: the stack it drives, the state it tracks while jobs run, and phase 1's driver.

What it does to the stack lives in its mixins: ``Workload`` (submits), ``Actions`` (stop paths and
kills), ``Disruptions`` (restarts), ``Race`` (phase 2) and ``Evidence`` (what the checks read).
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from chaos.actions import Actions
from chaos.beyond import BeyondCancel
from chaos.console import fmt_s, say
from chaos.disruptions import Disruptions
from chaos.errors import Transient
from chaos.evidence import Evidence
from chaos.faults import Faults
from chaos.plan import Plan
from chaos.race import Race
from chaos.workload import Workload

ACTIVE = ("pending", "running", "cancelling")


class Harness(Workload, Actions, BeyondCancel, Disruptions, Faults, Race, Evidence):
    def __init__(self, plan: Plan, seed: int, home: Path, ports: dict[str, int], flower_auth: str,
                 database_url: str | None = None, pg=None) -> None:
        import httpx

        from chaos.checks import Record
        from chaos.procs import ChaosStack

        self.plan = plan
        self.seed = seed
        self.rng = random.Random(seed)
        self.rng_lock = threading.Lock()
        self.home = home
        self.stack = ChaosStack(home, ports["redis"], ports["api"], ports["flower"], flower_auth,
                                workers=plan.workers, concurrency=plan.concurrency)
        self.flower_auth = tuple(flower_auth.split(":", 1))
        self.record = Record()
        self.lock = threading.Lock()
        self.stop_actions = threading.Event()
        self.active: dict[str, str] = {}  # job id -> status, for every non-terminal job in the database
        self.redis_down = threading.Event()
        self.disruptions_done = [threading.Event() for _ in plan.disruptions]
        self.reported_deaths: set[int] = set()
        #: jobs whose message the harness deleted: no action targets them, the submitter doesn't count them
        #: in flight — nothing but andon may end them (re-sent and completed, or ended with a clear reason)
        self.protected: set[str] = set()
        self.hold_submits = threading.Event()  # no new submits while Redis is paused or down for long
        self.database_url = database_url or f"sqlite:///{home / 'andon.db'}"
        self.db = "sqlite" if self.database_url.startswith("sqlite") else "postgres"
        self.pg = pg  # tests.pgserver.PostgresServer for the Postgres phase
        self.restarting: set[str] = set()
        self.given_up: set[str] = set()
        self.celery_meta: dict[str, dict] = {}
        self.notes: list[str] = []  # harness-level findings (become "harness"/"processes" violations)
        self.timeline: list[str] = []
        self.local = threading.local()
        self.httpx = httpx
        self.cli = self._cli_command()
        self.phase_times: dict[str, float] = {}
        self.t0 = time.monotonic()

    # -- small utilities -----------------------------------------------------------------------------

    def rand(self, fn, *args):
        with self.rng_lock:
            return getattr(self.rng, fn)(*args)

    def client(self):
        if not hasattr(self.local, "client"):
            self.local.client = self.httpx.Client(timeout=20)
        return self.local.client

    @staticmethod
    def _cli_command() -> list[str]:
        script = Path(sys.executable).parent / "andon"
        return [str(script)] if script.exists() else [sys.executable, "-m", "api.cli"]

    def retry(self, what: str, fn, timeout: float = 45.0):
        """Call ``fn`` until it stops raising Transient / connection errors, for at most ``timeout`` s."""
        from redis.exceptions import RedisError
        from sqlalchemy.exc import OperationalError

        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                return fn()
            except (Transient, self.httpx.TransportError, RedisError, OperationalError) as exc:
                with self.lock:
                    self.record.transient[f"{what}: {type(exc).__name__}"] += 1
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what}: still failing after {timeout:.0f}s: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def note(self, msg: str) -> None:
        with self.lock:
            self.notes.append(msg)
        say(f"NOTE: {msg}")

    def mark(self, msg: str) -> None:
        with self.lock:
            self.timeline.append(f"{fmt_s(time.monotonic() - self.t0)}  {msg}")
        say(msg)

    # -- the stack -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.t0 = time.monotonic()
        say(f"starting the stack in {self.home} (seed {self.seed})")
        self.stack.start()
        self.phase_times["start"] = time.monotonic() - self.t0
        say(f"stack up in {self.phase_times['start']:.1f}s: API {self.stack.api_url}, Flower "
            f"{self.stack.flower_url}, workers {', '.join(w.name for w in self.stack.workers)}")

    # -- reading state -------------------------------------------------------------------------------

    def poll_active(self) -> None:
        from sqlalchemy import select

        from db.models import Job
        from db.session import session_scope

        with session_scope() as session:
            rows = session.execute(select(Job.id, Job.status).where(Job.status.in_(ACTIVE))).all()
        with self.lock:
            self.active = dict(rows)

    def poller(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.poll_active()
            except Exception as exc:  # the database is local; a lock timeout is worth retrying
                with self.lock:
                    self.record.transient[f"poll: {type(exc).__name__}"] += 1
            stop.wait(0.2)

    def in_flight(self) -> int:
        with self.lock:
            return sum(1 for j in self.active if self.record.submitted.get(j, {}).get("phase") == "chaos"
                       and j not in self.protected)

    # -- waiting ---------------------------------------------------------------------------------------

    def waiting_on(self) -> dict[str, str]:
        """Non-terminal jobs the harness submitted or andon made itself (auto-resume), and any other row a
        worker has taken up. A row left ``pending`` by a submit that answered 5xx (an "orphan", never
        enqueued) is not waited for: the checks report it."""
        from sqlalchemy import select

        from db.models import Job
        from db.session import session_scope

        with self.lock:
            active = dict(self.active)
            known = set(self.record.submitted)
        unknown = [j for j in active if j not in known]
        if unknown:
            with session_scope() as session:
                resumed = set(session.scalars(select(Job.id).where(Job.id.in_(unknown),
                                                                   Job.resumed_from.is_not(None))))
            known |= resumed
        return {j: s for j, s in active.items() if j in known or s != "pending"}

    def wait_terminal(self, timeout: float, what: str) -> bool:
        deadline = time.monotonic() + timeout
        left: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                self.poll_active()
                left = {j: s for j, s in self.waiting_on().items() if j not in self.given_up}
            except Exception:
                time.sleep(0.2)
                continue
            if not left:
                return True
            time.sleep(0.25)
        self.given_up |= set(left)  # reported by the checks ("non-terminal"); not waited for again
        lost = {j for j in left if j in self.protected}  # reported as "lost-message", not a harness failure
        if len(left) > len(lost):
            self.note(f"{what}: {len(left) - len(lost)} jobs still not terminal after {timeout:.0f}s: "
                      f"{dict(Counter(s for j, s in left.items() if j not in lost))}")
        if lost:
            self.mark(f"{what}: {len(lost)} jobs whose message the harness deleted still pending after "
                      f"{timeout:.0f}s")
        return False

    # -- phase 1 driver --------------------------------------------------------------------------------

    def run_chaos(self) -> None:
        started = time.monotonic()
        self.mark(f"phase 1: {self.plan.jobs} jobs through the API, random cancels, kills, restarts")
        stop_poll = threading.Event()
        poller = threading.Thread(target=self.poller, args=(stop_poll,), daemon=True)
        poller.start()
        pool = ThreadPoolExecutor(max_workers=6, thread_name_prefix="chaos-act")
        actor = threading.Thread(target=self.actor, args=(pool,), daemon=True)
        disruptor = threading.Thread(target=self.disruptor, daemon=True)
        actor.start()
        disruptor.start()
        try:
            self.submitter()
            disruptor.join(timeout=self.plan.budget_s * 0.3)
            # keep acting until the last jobs are done (bounded)
            until = time.monotonic() + 60
            while time.monotonic() < until and self.in_flight() > 0:
                time.sleep(0.2)
        finally:
            self.stop_actions.set()
            actor.join(timeout=10)
            pool.shutdown(wait=True)
            stop_poll.set()
            poller.join(timeout=5)
        self.worker_deaths("at the end of phase 1")
        self.phase_times["chaos"] = time.monotonic() - started
        drain = time.monotonic()
        self.wait_terminal(self.plan.drain_s, "phase 1 drain")
        self.phase_times["chaos drain"] = time.monotonic() - drain
        self.mark(f"phase 1 done: {len(self.submitted('chaos'))} jobs, {len(self.record.actions)} actions")
