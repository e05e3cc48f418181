"""Item retries for transient failures and LLM usage totals (issue 13 items 9 and 5): a stage names
the exceptions worth another try; the backoff is a cancellable wait; every retry is counted on the
item; an item's reported LLM usage adds up on its job."""

from __future__ import annotations

import threading
import time

import pytest

from api import service
from tasks import CancellationError, CancellationToken, JobContext, Pipeline, Retry, stage
from tasks.errors import PipelineError
from tests.jobs_helpers import items, wait_terminal


class Busy(Exception):
    pass


def test_a_stage_is_tried_again_on_the_exceptions_it_names():
    tries: dict[int, int] = {}

    def shaky(value: int) -> int:
        tries[value] = tries.get(value, 0) + 1
        if value == 1 and tries[value] < 3:
            raise Busy("429")
        if value == 2:
            raise ValueError("not transient")  # not named: fails at once
        return value * 10

    run = Pipeline("retry-local", [stage(shaky, retry=Retry(on=Busy, attempts=3, backoff_s=0.01))],
                   register=False).run_local([0, 1, 2])
    assert run.results == {0: 0, 1: 10} and run.retries == {1: 2}
    assert run.failed[2].startswith("ValueError") and tries[2] == 1


def test_a_cancel_ends_a_backoff_at_once():
    async def always_busy(value, ctx: JobContext):
        raise Busy("503")

    for fn in (always_busy, lambda_free_busy):
        pipeline = Pipeline("retry-cancel", [stage(fn, name="call", retry=Retry(on=Busy, attempts=50, backoff_s=20,
                                                                               max_backoff_s=20))], register=False)
        token = CancellationToken("local")
        threading.Timer(0.3, token.cancel).start()
        started = time.monotonic()
        run = pipeline.run_local(["x"], token=token)
        assert time.monotonic() - started < 3
        assert isinstance(run.cancelled, CancellationError) and run.interrupted == {0: "call"}


def lambda_free_busy(value):
    raise Busy("503")


def test_retry_is_checked_when_declared():
    with pytest.raises(PipelineError, match="Exception classes"):
        Retry(on="Busy")
    with pytest.raises(PipelineError, match="attempts"):
        Retry(on=Busy, attempts=0)
    with pytest.raises(PipelineError, match="tasks.Retry"):
        Pipeline("retry-bad", [lambda_free_busy], retry=3, register=False)


def test_retries_are_counted_on_the_items_of_a_real_job(worker):
    ok = wait_terminal(service.submit_job(["a", "b"], pipeline="user-flaky").job_id)
    assert ok.status == "completed"
    assert [(r.status, r.retries) for r in items(ok.id)] == [("done", 2), ("done", 2)]
    assert all(r.result["tries"] == 3 for r in items(ok.id))
    bad = wait_terminal(service.submit_job(["a"], pipeline="user-hopeless").job_id)
    assert bad.status == "failed"
    failed = service.partial_results(bad.id).failed_items
    assert failed[0].retries == 1 and failed[0].error == "Flaky: always"


def test_llm_usage_adds_up_on_the_job(worker, api_client):
    job_id = service.submit_job(["x", "y", "z"], pipeline="user-llm").job_id
    wait_terminal(job_id)
    usage = api_client.get(f"/api/jobs/{job_id}").json()["usage"]
    assert usage == {"prompt_tokens": 21, "completion_tokens": 33, "items": 3, "cut_short_items": 0,
                     "estimated": False}
    plain = service.submit_job(["One. Two."]).job_id
    wait_terminal(plain)
    assert api_client.get(f"/api/jobs/{plain}").json()["usage"] is None
    from prometheus_client.registry import REGISTRY

    from api.metrics import JobMetrics

    for collector in list(REGISTRY._collector_to_names):  # /metrics sums tokens at most every 30 s
        if isinstance(collector, JobMetrics):
            collector._token_rows = None
    scraped = api_client.get("/metrics").text
    line = next(x for x in scraped.splitlines()
                if x.startswith("andon_llm_tokens_total{") and 'pipeline="user-llm"' in x and 'kind="completion"' in x)
    assert float(line.rsplit(" ", 1)[1]) >= 33
