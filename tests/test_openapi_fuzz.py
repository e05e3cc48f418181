"""Schemathesis over the API's own OpenAPI document, against the real uvicorn process (real Redis,
SQLite and prefork worker behind it).

Every operation gets a bounded number of generated requests, valid and invalid. Each answer must be:
no 5xx, a documented status code, a documented content type, a body matching the documented schema,
and every 4xx must say what was wrong: a JSON ``detail`` that is a non-empty string, or (FastAPI's
422) a non-empty list of errors each with ``msg`` and ``loc``.

Submitted jobs are real, so requests are kept cheap before they are sent: at most a few short
documents, no simulated stage work (``stage_delay_s``, the test pipelines' ``block_s`` / ``spin_s``), no
LLM analyzer, no tiny time or memory limits that would make the worker kill its children. Path
parameters are sometimes real job ids (a completed job, a cancelled one), so the 400 paths (already
terminal, not resumable) are reached too, not only 404. ``GET /api/jobs/{id}/events`` streams until
the job ends, so it only ever sees generated (unknown) ids, which answer 404 at once; a request
timeout guards every call anyway. Afterwards every unfinished job is cancelled.

The cases come from ``operation.as_strategy`` (positive and negative) under a plain ``@given``, not
``schemathesis.pytest.from_fixture``: the lazy loader sets ``request.node._nodeid``, which pytest 9
no longer has (AttributeError), and the schema can only be loaded once the server fixture runs.
Set ANDON_FUZZ_EXAMPLES for a longer hunt (400 per operation takes ~80 s).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import GenerationMode, checks

from api.app import app
from tests.jobs_helpers import docs, wait_items, wait_terminal

#: Generated requests per operation (10 operations): ~15 s for the module on 2 cores.
MAX_EXAMPLES = int(os.environ.get("ANDON_FUZZ_EXAMPLES", "50"))
REQUEST_TIMEOUT_S = 10
MAX_DOCUMENTS = 3
MAX_DOCUMENT_CHARS = 200
#: Options that make a job (or the worker) slow when given large values: always sent as 0.
WORK_OPTIONS = ("stage_delay_s", "block_s", "spin_s")
#: Options that make the worker kill or recycle its child when tiny: dropped when positive.
LIMIT_OPTIONS = ("soft_time_limit_s", "time_limit_s", "max_rss_mb", "escalate_after_s", "kill_after_s")
EVENTS_PATH = "/api/jobs/{job_id}/events"

# Hypothesis keeps caches (constants, unicode data) in ./.hypothesis: keep them in the session's home.
set_hypothesis_home_dir(Path(os.environ["ANDON_HOME"]) / "hypothesis")


@pytest.fixture(scope="module")
def known_jobs(api_server) -> list[str]:
    """A completed job and a cancelled one, for path parameters that name real jobs."""
    with httpx.Client(base_url=api_server, timeout=REQUEST_TIMEOUT_S) as client:
        def submit(n: int, delay: float) -> str:
            answer = client.post("/api/jobs", json={"documents": docs(n), "options": {"stage_delay_s": delay}})
            assert answer.status_code == 202, answer.text
            return answer.json()["job_id"]

        completed = submit(2, 0.0)
        cancelled = submit(20, 0.2)
        wait_items(cancelled, 1)
        answer = client.post(f"/api/jobs/{cancelled}/cancel", json={"reason": "user_requested"})
        assert answer.status_code == 202, answer.text
        wait_terminal(completed)
        wait_terminal(cancelled)
    return [completed, cancelled]


@pytest.fixture(scope="module")
def api_schema(api_server, known_jobs):
    """The schema as the running server serves it; every unfinished job is cancelled afterwards."""
    loaded = schemathesis.openapi.from_url(f"{api_server}/openapi.json")
    loaded.config.update(base_url=api_server, request_timeout=REQUEST_TIMEOUT_S)
    yield loaded
    _cancel_unfinished(api_server)


def _cancel_unfinished(api_server: str) -> None:
    with httpx.Client(base_url=api_server, timeout=REQUEST_TIMEOUT_S) as client:
        for status in ("running", "pending"):
            answer = client.post("/api/jobs/cancel", json={"status": status, "message": "openapi fuzz cleanup"})
            assert answer.status_code == 202, answer.text


#: ``GET /api/events`` streams until the client leaves, whatever it is sent: a fuzzed request could only
#: time out. tests/test_dashboard.py reads it.
UNENDING = {("GET", "/api/events")}
OPERATIONS = [(method.upper(), path) for path, methods in app.openapi()["paths"].items() for method in methods
              if (method.upper(), path) not in UNENDING]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cheap(case) -> None:
    """Make submitted jobs cheap to run (a submit's, or every step of a chain or chord), keeping
    whatever makes the request invalid."""
    if case.method.upper() != "POST" or not isinstance(case.body, dict):
        return
    if case.path == "/api/jobs":
        _cheap_job(case.body)
    elif case.path in ("/api/chains", "/api/chords"):
        steps = [case.body.get("body")]
        for field in ("jobs", "header"):
            if isinstance(case.body.get(field), list):
                steps += case.body[field]
        for step in steps:
            if isinstance(step, dict):
                _cheap_job(step)


def _cheap_job(body: dict) -> None:
    documents = body.get("documents")
    if isinstance(documents, list) and documents:
        body["documents"] = [d[:MAX_DOCUMENT_CHARS] if isinstance(d, str) else d for d in documents[:MAX_DOCUMENTS]]
    options = body.get("options")
    if isinstance(options, dict):
        for name in WORK_OPTIONS:
            if _is_number(options.get(name)) and options[name] > 0:
                options[name] = 0
        for name in LIMIT_OPTIONS:
            if _is_number(options.get(name)) and options[name] > 0:
                del options[name]
        if options.get("analyzer") == "llm":
            options["analyzer"] = "local"


@schemathesis.check
def client_errors_say_why(ctx, response, case) -> bool | None:
    """Every 4xx carries a clear message: a non-empty ``detail`` string, or FastAPI's 422 error list."""
    status = response.status_code
    if not 400 <= status < 500:
        return None
    request = f"{case.method} {case.formatted_path} body={case.body!r:.300}"
    try:
        body = response.json()
    except Exception:
        raise AssertionError(f"{status} without a JSON body for {request}: {response.text[:300]!r}") from None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str) and detail.strip():
        return True
    if status == 422 and isinstance(detail, list) and detail and all(
        isinstance(error, dict) and isinstance(error.get("msg"), str) and error["msg"].strip()
        and isinstance(error.get("loc"), list) and error["loc"]
        for error in detail
    ):
        return True
    raise AssertionError(f"{status} without a clear `detail` for {request}: {response.text[:300]!r}")


CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, client_errors_say_why]


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_api_answers_every_generated_request_cleanly(api_schema, known_jobs, method, path):
    operation = api_schema[path][method]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))
    # Path parameters sometimes name a real job (never for the SSE stream, which would follow the job).
    real_ids = st.just(None) if path == EVENTS_PATH else st.sampled_from([None, *known_jobs])

    @given(case=cases, real_id=real_ids)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    def answers_cleanly(case, real_id):
        if real_id is not None and isinstance((case.path_parameters or {}).get("job_id"), str):
            case.path_parameters["job_id"] = real_id
        _cheap(case)
        case.call_and_validate(checks=CHECKS)

    answers_cleanly()


BODY_OPERATIONS = [(method, path) for method, path in OPERATIONS
                   if "requestBody" in app.openapi()["paths"][path][method.lower()]]


@pytest.mark.parametrize(("method", "path"), BODY_OPERATIONS, ids=[f"{m} {p}" for m, p in BODY_OPERATIONS])
def test_a_body_that_is_not_utf8_gets_a_documented_client_error(api_schema, known_jobs, method, path):
    """What the fuzzer finds only by chance (its negative bodies include raw bytes), made certain:
    FastAPI answers 400 "There was an error parsing the body" to a JSON body that isn't UTF-8."""
    path_parameters = {"job_id": known_jobs[1]} if "{job_id}" in path else None
    case = api_schema[path][method].Case(body=b"\xff\xfe{", media_type="application/json",
                                        path_parameters=path_parameters)
    case.call_and_validate(checks=CHECKS)
