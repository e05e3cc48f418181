"""Phase 1's "beyond cancel" actions (issue 13): supersede races and idempotent retries, over real HTTP.

* ``supersede_race``: 2–4 submits at once (threads) with one fresh ``supersede_key``; the checks want
  exactly one of them left unsuperseded (the newest), every other ended ``cancelled``/``superseded``
  by a job with the same key, and none of those resumed.
* ``idem_retry``: one submit sent 2–3 times with one ``Idempotency-Key`` (the retries at once), then
  the same key with another body; the checks want one job_id in every same-body answer, one row for
  that body, a 409 for the other body and no row for it.

Jobs of both are their own phases (``supersede``, ``idem``): no cancel action targets them (a SIGKILL
may), and they are not counted in flight.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from chaos.console import now
from chaos.errors import Transient


class BeyondCancel:
    """Mixed into ``chaos.harness.Harness``, whose state it uses."""

    def _beyond_body(self, tag: str, docs: int) -> dict:
        return {"documents": [f"Beyond document {tag}-{i}. The quick brown fox jumps over the lazy dog."
                              for i in range(docs)],
                "options": {"stage_delay_s": round(self.rand("uniform", self.plan.min_delay_s,
                                                             self.plan.max_delay_s), 3)}}

    def _beyond_ready(self) -> bool:
        return not (self.redis_down.is_set() or self.hold_submits.is_set() or self.stop_actions.is_set())

    def _post_job(self, body: dict, headers: dict | None = None, what: str = "submit"):
        """POST /api/jobs, retried on 5xx / connection errors (a 5xx is not replayed: the key is freed).
        Returns the final answer (status, JSON or text)."""
        def post():
            answer = self.client().post(f"{self.stack.api_url}/api/jobs", json=body, headers=headers or {})
            if answer.status_code >= 500:
                with self.lock:
                    self.record.submit_errors.append(f"{what}: {answer.status_code} {answer.text[:200]}")
                raise Transient(f"{what} answered {answer.status_code}")
            if answer.status_code == 409 and "still running" in answer.text:
                raise Transient(f"{what}: first request still running (409)")
            try:
                payload = answer.json()
            except ValueError:
                payload = answer.text[:300]
            return answer.status_code, payload

        return self.retry(what, post, timeout=60)

    def supersede_race(self) -> None:
        from chaos.checks import Act

        if not self._beyond_ready():
            return
        n = self.rand("randint", 2, 4)
        key = f"chaos-sup-{self.seed}-{self.rand('randrange', 10**9)}"
        bodies = [{**self._beyond_body(f"{key}-{i}", self.rand("randint", 3, 8)), "supersede_key": key}
                  for i in range(n)]
        act = Act("supersede_race", key, now(), source="superseded")
        with self.lock:
            self.record.actions.append(act)
            self.record.supersedes[key] = []
        barrier = threading.Barrier(n)

        def one(body: dict) -> str | None:
            try:
                barrier.wait(timeout=10)
            except threading.BrokenBarrierError:
                pass
            status, payload = self._post_job(body, what="supersede submit")
            if status != 202:
                raise RuntimeError(f"supersede submit answered {status}: {payload}")
            job_id = payload["job_id"]
            with self.lock:
                self.record.submitted[job_id] = {"phase": "supersede", "deadline_s": None,
                                                 "docs": len(body["documents"]), "key": key}
                self.record.supersedes[key].append(job_id)
                self.active.setdefault(job_id, "pending")
            return job_id

        with ThreadPoolExecutor(max_workers=n) as pool:
            futures = [pool.submit(one, b) for b in bodies]
            errors = [f.exception() for f in futures if f.exception() is not None]
        act.result = f"sent {n}" if not errors else f"error: {errors[0]}"
        if errors:
            self.note(f"supersede race {key} failed: {errors[0]}")

    def idem_retry(self) -> None:
        from chaos.checks import Act

        if not self._beyond_ready():
            return
        key = f"chaos-idem-{self.seed}-{self.rand('randrange', 10**9)}"
        tag = key
        body = self._beyond_body(tag, self.rand("randint", 3, 8))
        other = {**body, "documents": [*body["documents"], f"Beyond document {tag}-other."]}
        same = self.rand("randint", 2, 3)
        first_alone = self.rand("random") < 0.5  # else every same-body request at once
        act = Act("idem_retry", key, now(), source="idempotency")
        entry = {"key": key, "tag": tag, "same": same, "answers": [], "other": None, "at": act.at}
        with self.lock:
            self.record.actions.append(act)
            self.record.idempotent.append(entry)
        headers = {"Idempotency-Key": key}
        try:
            answers = []
            if first_alone:
                answers.append(self._post_job(body, headers, "idempotent submit"))
            with ThreadPoolExecutor(max_workers=same) as pool:
                rest = same - len(answers)
                answers += list(pool.map(lambda _: self._post_job(body, headers, "idempotent submit"),
                                         range(rest)))
            entry["answers"] = answers
            ids = {p.get("job_id") for s, p in answers if s == 202 and isinstance(p, dict)}
            for job_id in ids:
                with self.lock:
                    self.record.submitted[job_id] = {"phase": "idem", "deadline_s": None,
                                                     "docs": len(body["documents"]), "key": key}
                    self.active.setdefault(job_id, "pending")
            entry["other"] = self._post_job(other, headers, "idempotent submit (other body)")
            act.result = f"sent {same}+1"
        except Exception as exc:
            act.result = f"error: {exc}"
            self.note(f"idempotent retries {key} failed: {exc}")
