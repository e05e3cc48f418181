"""The chaos harness's own checks judge andon fairly (chaos/checks.py, on rows made up here): a
false violation sends the next engineer after a bug andon doesn't have."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

from chaos.checks import Record, check_beyond, check_streams


def row(job_id: str, inputs: list[str], resumed_from: str | None = None, status: str = "completed", **more):
    fields = dict(id=job_id, status=status, inputs=inputs, resumed_from=resumed_from, resumed_by=None, error=None,
                  cancellation_reason=None, cancellation_source=None, supersede_key=None)
    return SimpleNamespace(**{**fields, **more})


def idempotency_violations(jobs: list) -> list:
    tag = "chaos-idem-1-2"
    record = Record()
    record.idempotent.append({"key": tag, "tag": tag, "same": 2, "at": datetime.now(UTC),
                              "answers": [(202, {"job_id": "a"}), (202, {"job_id": "a"})],
                              "other": (409, {"detail": "another body"})})
    out, _ = check_beyond(record, jobs, [], {}, max_resumes=3, policy_on=False)
    return [v for v in out if v[0] == "idempotency"]


def test_a_resume_of_an_idempotent_job_is_not_a_second_row_for_its_key():
    docs = ["Beyond document chaos-idem-1-2-0.", "Beyond document chaos-idem-1-2-1."]
    stopped = row("a", docs, status="cancelled", cancellation_reason="system_shutdown", resumed_by="b")
    assert idempotency_violations([stopped, row("b", docs, resumed_from="a")]) == []  # a warm restart's resume
    assert idempotency_violations([stopped, row("c", docs)]) != []  # a second submit is still caught


def storm(before: float, during: float, after: float) -> Record:
    record = Record()
    record.faults.append({"kind": "streams", "streams": 150, "statuses": {"200": 150}, "open_errors": 0,
                          "before_max_s": before, "during_max_s": during, "after_max_s": after,
                          "conns": [3, 153, 2], "threads": [4, 9, 8]})
    return record


def test_the_stream_storm_is_judged_against_how_fast_the_api_answered_just_before():
    assert check_streams(storm(before=0.3, during=1.2, after=0.4)) == []
    assert len(check_streams(storm(before=0.3, during=5.7, after=2.3))) == 2  # an idle box: 5 s / 2 s
    assert check_streams(storm(before=2.0, during=5.7, after=2.3)) == []  # a box this busy: 3× its own pace
    assert len(check_streams(storm(before=2.0, during=float("inf"), after=float("inf")))) == 2  # stalled: never
