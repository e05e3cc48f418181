"""Phase 1's workload: jobs submitted through the API over time, a bounded number in flight."""

from __future__ import annotations

import time

from chaos.errors import Transient


class Workload:
    """Phase 1's workload: jobs submitted through the API over time, a bounded number in flight. Mixed into ``chaos.harness.Harness``, whose state it uses."""

    def documents(self) -> list[str]:
        n = self.rand("randint", self.plan.min_docs, self.plan.max_docs)
        tag = self.rand("randrange", 10**6)
        return [f"Chaos document {tag}-{i}. The quick brown fox jumps over the lazy dog. Foxes are quick."
                for i in range(n)]

    def submit_one(self, phase: str = "chaos", docs: int | None = None, delay: float | None = None) -> str:
        """Submit a job through the API. ``phase="anchor"``: a long job the stream storm listens to, with
        ``docs`` documents and ``delay`` per stage, that no harness action targets."""
        if phase == "anchor":
            body = {"documents": [f"Anchor document {i}. It keeps an event stream open." for i in range(docs)],
                    "options": {"stage_delay_s": delay}}
        else:
            body = {"documents": self.documents(),
                    "options": {"stage_delay_s": round(self.rand("uniform", self.plan.min_delay_s,
                                                                self.plan.max_delay_s), 3)}}
            if self.rand("random") < self.plan.deadline_share:
                body["deadline_s"] = round(self.rand("uniform", 0.4, 3.0), 2)

        def post():
            answer = self.client().post(f"{self.stack.api_url}/api/jobs", json=body)
            if answer.status_code >= 500:
                with self.lock:
                    self.record.submit_errors.append(f"{answer.status_code} {answer.text[:200]}")
                raise Transient(f"submit answered {answer.status_code}")
            if answer.status_code != 202:
                raise RuntimeError(f"submit answered {answer.status_code}: {answer.text[:300]}")
            return answer.json()["job_id"]

        job_id = self.retry("submit", post)
        with self.lock:
            self.record.submitted[job_id] = {"phase": phase, "deadline_s": body.get("deadline_s"),
                                             "docs": len(body["documents"])}
            self.active.setdefault(job_id, "pending")
        return job_id

    def submitter(self) -> None:
        deadline = time.monotonic() + self.plan.budget_s * 0.5
        while len(self.submitted("chaos")) < self.plan.jobs:
            if time.monotonic() > deadline:
                self.note(f"submitting stopped at {len(self.submitted('chaos'))} jobs: out of time")
                return
            if self.hold_submits.is_set() or not self.disruption_gate(len(self.submitted("chaos"))):
                time.sleep(0.1)
                continue
            if self.in_flight() < self.plan.in_flight:
                self.submit_one()
                time.sleep(self.rand("uniform", 0.02, 0.12))
            else:
                time.sleep(0.05)

    def submitted(self, phase: str) -> list[str]:
        with self.lock:
            return [j for j, m in self.record.submitted.items() if m["phase"] == phase]
