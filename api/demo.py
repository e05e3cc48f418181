"""``andon demo``: submit a pipeline job, cancel it a third of the way in, show what was kept,
then resume it: the new job reuses the finished items and runs only the rest.

It talks to the stack over HTTP like any client would, starting the embedded stack first if no API
answers.
"""

from __future__ import annotations

import time

import httpx
from rich.console import Console

from api import views
from api.stack import Stack, free_port, port_is_free
from db.settings import get_settings

TOPICS = [
    ("contract", "The supplier shall deliver the goods within thirty days. Late delivery incurs a penalty of two "
                 "percent per week. Either party may terminate the contract with ninety days notice."),
    ("incident", "The database primary failed over at 03:12 UTC. Replication lag peaked at forty seconds. "
                 "No customer data was lost and the failover completed automatically."),
    ("research", "Transformer models scale predictably with data and compute. Larger models need fewer samples "
                 "to reach the same loss. Careful data curation matters as much as model size."),
    ("support", "The customer cannot log in after resetting the password. The reset email arrived late. "
                "Clearing the browser cache solved the login problem."),
    ("finance", "Quarterly revenue grew by twelve percent. Operating costs stayed flat thanks to automation. "
                "The board approved a new dividend for shareholders."),
]


def demo_documents(count: int = 30) -> list[str]:
    """Deterministic documents; number 4 is blank on purpose (it fails at parse, the job goes on)."""
    docs = []
    for i in range(count):
        topic, text = TOPICS[i % len(TOPICS)]
        docs.append("   " if i == 4 else f"Document {i + 1} about {topic}. {text}")
    return docs


TERMINAL = ("cancelled", "completed", "failed")


def _wait_for(client: httpx.Client, job_id: str, done) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").raise_for_status().json()
        if done(job):
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not get there in 60s")


def run_demo(console: Console, documents: int = 30, stage_delay_s: float = 0.1) -> dict:
    settings = get_settings()
    api_url = settings.resolved_api_url
    stack = None
    try:
        httpx.get(f"{api_url}/healthz", timeout=1).raise_for_status()
        console.print(f"Using the stack at {api_url}")
    except httpx.HTTPError:
        ports = [p if port_is_free(p) else free_port() for p in (8000, 5555, settings.redis_port)]
        stack = Stack(api_port=ports[0], flower_port=ports[1], redis_port=ports[2], concurrency=2)
        with console.status("Starting the embedded stack (Redis, worker, API, Flower)..."):
            stack.start()
        api_url = stack.api_url
        console.print(f"Started the embedded stack: API {stack.api_url}, Flower {stack.flower_url}")
    headers = {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
    try:
        with httpx.Client(base_url=api_url, headers=headers, timeout=10) as client:
            t0 = time.monotonic()
            body = {"documents": demo_documents(documents), "options": {"stage_delay_s": stage_delay_s}}
            job_id = client.post("/api/jobs", json=body).raise_for_status().json()["job_id"]
            console.print(f"Submitted job [bold]{job_id}[/] with {documents} documents "
                          f"({stage_delay_s}s per stage)")
            third = documents // 3
            _wait_for(client, job_id, lambda j: j["completed_items"] + j["failed_items"] >= third)
            answer = client.post(f"/api/jobs/{job_id}/cancel",
                                 json={"reason": "user_requested", "message": "demo: stopped a third of the way"})
            console.print(f"Cancel requested after {time.monotonic() - t0:.1f}s: {answer.json()['status']}")
            job = _wait_for(client, job_id, lambda j: j["status"] in TERMINAL)
            results = client.get(f"/api/jobs/{job_id}/partial-results").raise_for_status().json()
            views.print_job(console, job)
            views.print_partial_results(console, results)

            # keep what was paid for: a new job reuses the finished items and runs only the rest
            resumed_id = client.post(f"/api/jobs/{job_id}/resume", params={"force": "true"}) \
                .raise_for_status().json()["job_id"]
            resumed = _wait_for(client, resumed_id, lambda j: j["status"] in TERMINAL)
            after = client.get(f"/api/jobs/{resumed_id}/partial-results").raise_for_status().json()
        reused = len(results["results"])
        console.print(f"\nResumed as [bold]{resumed_id}[/]: {resumed['status']}, reused {reused} finished items, "
                      f"ran the other {resumed['total_items'] - reused}; partial results now "
                      f"[bold]{after['status']}[/] ({after['completed_items']} of {after['total_items']} done, "
                      f"{len(after['failed_items'])} failed)")
        console.print(f"Demo finished in {time.monotonic() - t0:.1f}s.")
        return {"job": job, "partial_results": results, "resumed": resumed, "resumed_results": after}
    finally:
        if stack is not None:
            with console.status("Stopping the embedded stack..."):
                stack.stop()
