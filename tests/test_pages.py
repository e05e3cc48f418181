"""Reads that stay fast at a million rows: cursor pages of lists and of partial results (no gaps, no
duplicates while jobs are added), a bad cursor is a 422, /metrics counts what the rows say, and
migration 0013 fills the tags' copy of ``created_at``."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, text, update

from db import jobs as job_rows
from db.models import Job, JobTag, utcnow
from db.session import session_scope, transaction
from db.vocabulary import ItemStatus, JobStatus

ANDON = str(Path(sys.executable).parent / "andon")


@pytest.fixture
def reader(database):
    """The API in-process over the session's database; no worker needed (the rows are made here)."""
    from fastapi.testclient import TestClient

    from api.app import app

    with TestClient(app) as client:
        yield client


def _make_jobs(count: int, *, pipeline: str, tag: str, status: JobStatus = JobStatus.COMPLETED,
               batch: bool = False) -> list[str]:
    """``count`` ended jobs: one batch insert (every one the same ``created_at``: the id breaks the
    tie) or one at a time."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    with session_scope() as session:
        if batch:
            job_rows.create_jobs(session, [{"id": job_id, "inputs": ["a"], "options": {}, "pipeline": pipeline,
                                            "tags": [tag]} for job_id in ids])
        else:
            for job_id in ids:
                job_rows.create_job(session, job_id, ["a"], {}, pipeline=pipeline, tags=[tag])
                session.flush()
        session.execute(update(Job).where(Job.id.in_(ids)).values(status=status.value, finished_at=utcnow()))
    return ids


def _newest_first(ids: list[str]) -> list[str]:
    with session_scope() as session:
        rows = session.execute(select(Job.id).where(Job.id.in_(ids))
                               .order_by(Job.created_at.desc(), Job.id)).scalars().all()
    return list(rows)


def _walk(reader, params: dict, on_page=None) -> list[str]:
    """Every job id of a list, page by page through the ``Link`` headers."""
    seen, url, pages = [], "/api/jobs", 0
    while url:
        answer = reader.get(url, params=params if pages == 0 else None)
        assert answer.status_code == 200, answer.text
        seen += [job["job_id"] for job in answer.json()]
        url = answer.links.get("next", {}).get("url")
        pages += 1
        if on_page is not None:
            on_page(pages)
    return seen


@pytest.mark.parametrize("by", ["tag", "pipeline", "tag+status"])
def test_list_pages_have_no_gaps_or_duplicates_while_jobs_are_added(reader, by):
    name = f"pages-{uuid.uuid4().hex[:8]}"
    listed = _make_jobs(20, pipeline=name, tag=name) + _make_jobs(23, pipeline=name, tag=name, batch=True)
    listed += _make_jobs(20, pipeline=name, tag=name)
    params = {"tag": {"tag": name}, "pipeline": {"pipeline": name},
              "tag+status": {"tag": name, "status": "completed"}}[by]
    added: list[str] = []

    def add_more(pages: int) -> None:  # newer jobs arrive while the client pages: they are before page 1
        added.extend(_make_jobs(3, pipeline=name, tag=name, batch=pages % 2 == 0))

    seen = _walk(reader, {**params, "limit": 7}, on_page=add_more)
    assert len(seen) == len(set(seen)), "a job was listed twice"
    assert seen == _newest_first(listed), "pages skipped or reordered a job"
    assert added and not set(added) & set(seen)
    # from the start again, every job is there, the new ones first
    assert _walk(reader, {**params, "limit": 50}) == _newest_first(listed + added)


def test_a_tenant_sees_its_own_pages_only(database):
    from api import service

    name = f"tenant-pages-{uuid.uuid4().hex[:8]}"
    mine = _make_jobs(9, pipeline=name, tag=name)
    _make_jobs(5, pipeline=name, tag=name)
    with session_scope() as session:
        session.execute(update(Job).where(Job.id.in_(mine)).values(tenant="acme"))
    for which in (service.JobFilter(tag=name), service.JobFilter(pipeline=name)):
        seen, cursor = [], None
        while True:
            page, cursor = service.page_jobs(which, 4, cursor, tenant="acme")
            seen += [job.job_id for job in page]
            if cursor is None:
                break
        assert seen == _newest_first(mine)


@pytest.mark.parametrize("first_walk", [1, 3, 250])
def test_a_tags_list_with_a_sparse_filter_pages_exactly_whichever_side_drives(reader, monkeypatch, first_walk):
    """A tag with another filter its jobs rarely match: the page is read from the tag's index or the
    other filter's (api.service._tag_page), the tag's first entries or the side with fewer entries
    left — the same jobs in the same order every way, page after page, tenant or not."""
    from api import service

    monkeypatch.setattr(service, "FIRST_WALK", first_walk)
    name = f"sparse-{uuid.uuid4().hex[:8]}"
    rare = f"{name}-rare"
    ids = []
    for i in range(5):  # the rare jobs (own pipeline, failed) among many of the tag, in and out of a batch
        ids += _make_jobs(9, pipeline=name, tag=name, batch=i % 2 == 0)
        ids += _make_jobs(2, pipeline=rare, tag=name, status=JobStatus.FAILED, batch=i % 2 == 1)
    mine = ids[::3]
    with session_scope() as session:
        session.execute(update(Job).where(Job.id.in_(mine)).values(tenant="acme"))
    with session_scope() as session:
        jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}
    for params, match in (({"pipeline": rare}, lambda job: job.pipeline == rare),
                          ({"status": "failed"}, lambda job: job.status == "failed"),
                          ({"status": "completed"}, lambda job: job.status == "completed")):
        want = _newest_first([job_id for job_id, job in jobs.items() if match(job)])
        assert _walk(reader, {"tag": name, **params, "limit": 3}) == want, params
        seen, cursor = [], None
        which = service.JobFilter(tag=name, pipeline=params.get("pipeline"),
                                  status=JobStatus(params["status"]) if "status" in params else None)
        while True:
            page, cursor = service.page_jobs(which, 2, cursor, tenant="acme")
            seen += [job.job_id for job in page]
            if cursor is None:
                break
        assert seen == [job_id for job_id in want if job_id in mine], params


def _interleaved(url: str, name: str) -> dict[str, Job]:
    """120 jobs of a database of its own, newest last, in batches (one ``created_at`` each: the id
    breaks the tie) and one at a time: every other one tagged ``name``; pipeline ``{name}-big`` on
    half of the tagged and half of the untagged ones, interleaved; pipeline ``{name}-apart`` only on
    untagged ones (a tag and a filter that never meet); a third failed, a fifth tenant ``acme``."""
    ids = []
    with session_scope(url) as session:
        for chunk in range(6):
            jobs = []
            for i in range(chunk * 20, chunk * 20 + 20):
                pipeline = f"{name}-big" if i % 4 in (0, 1) else (f"{name}-apart" if i % 4 == 3 else name)
                jobs.append({"id": str(uuid.uuid4()), "inputs": ["a"], "options": {}, "pipeline": pipeline,
                             "tags": [name] if i % 2 == 0 else [], "tenant": "acme" if i % 5 == 0 else None})
            for start, end in ([(0, 20)] if chunk % 2 == 0 else [(k, k + 1) for k in range(20)]):
                job_rows.create_jobs(session, jobs[start:end])
                session.flush()
            ids += [job["id"] for job in jobs]
        session.execute(update(Job).where(Job.id.in_(ids[::3])).values(status="failed"))
    with session_scope(url) as session:
        return {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}


#: What the counts of api.service._tag_page say (the filter's entries, the tag's, both exact) to
#: take each way on SQLite: merge both sides, walk the filter's, walk the tag's.
SIDES = {"merge": (1, 1, True), "rows": (0, 1, False), "tag": (1, 0, False)}


@pytest.mark.parametrize("way", SIDES)
def test_a_tags_list_pages_exactly_by_index_keys_whichever_way_it_reads(own_database, monkeypatch, way):
    """Past the tag's first entries a page reads index keys only (api.service._tag_page): both sides
    merged, the filter's walked or the tag's (as the counts say on SQLite; PostgreSQL plans its one
    query itself): with two big interleaved sides, with sides that never meet (an empty list), with
    a tenant — the same jobs in the same order as the rows say, page after page."""
    from api import service

    monkeypatch.setattr(service, "FIRST_WALK", 2)
    monkeypatch.setattr(service, "_sizes", lambda *args: SIDES[way])
    name = f"keys-{uuid.uuid4().hex[:8]}"
    jobs = _interleaved(own_database, name)
    tagged = _tagged(own_database, name)
    for which, tenant in ((service.JobFilter(tag=name, pipeline=f"{name}-big"), None),
                          (service.JobFilter(tag=name, pipeline=f"{name}-apart"), None),
                          (service.JobFilter(tag=name, status=JobStatus.FAILED), None),
                          (service.JobFilter(tag=name, status=JobStatus.PENDING), "acme")):
        want = [job.id for job in sorted(jobs.values(), key=lambda job: (-job.created_at.timestamp(), job.id))
                if job.id in tagged and (which.pipeline is None or job.pipeline == which.pipeline)
                and (which.status is None or job.status == which.status.value)
                and (tenant is None or job.tenant == tenant)]
        assert want or which.pipeline == f"{name}-apart"
        for limit in (5, 7):
            seen, cursor = [], None
            while True:
                page, cursor = service.page_jobs(which, limit, cursor, tenant=tenant)
                seen += [job.job_id for job in page]
                assert len(page) == limit or cursor is None
                if cursor is None:
                    break
            assert seen == want, (which, tenant, limit)


def _tagged(url: str, tag: str) -> set[str]:
    with session_scope(url) as session:
        return set(session.scalars(select(JobTag.job_id).where(JobTag.tag == tag)))


def _cursor(value) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


BAD_CURSORS = ["not-a-cursor!", "e30", _cursor([1, 2]), _cursor(["2026-01-01T00:00:00"]), _cursor({"a": 1}),
               _cursor(["yesterday", "x"]), _cursor(["2026-01-01T00:00:00+00:00", "a\u0000b"]),
               _cursor(["2026-01-01T00:00:00+00:00", 7]), "x" * 513]


@pytest.mark.parametrize("cursor", BAD_CURSORS)
def test_a_cursor_the_api_did_not_give_out_is_422(reader, cursor):
    answer = reader.get("/api/jobs", params={"cursor": cursor})
    assert answer.status_code == 422, answer.text
    assert "cursor" in json.dumps(answer.json())


def _job_with_items(statuses: list[ItemStatus], *, job_status: JobStatus = JobStatus.CANCELLED) -> str:
    """A job whose items ended with ``statuses`` (index i: statuses[i]), written as a run writes them."""
    job_id = str(uuid.uuid4())
    with session_scope() as session:
        job_rows.create_job(session, job_id, [f"doc {i}" for i in range(len(statuses) + 3)], {})
    for index, status in enumerate(statuses):
        with transaction() as conn:
            job_rows.record_item(conn, job_id, index, "analyze", status, result={"words": index},
                                 error="boom" if status is ItemStatus.FAILED else None)
    with session_scope() as session:
        first_not_done = next(i for i, s in enumerate([*statuses, None]) if s is not ItemStatus.DONE)
        session.execute(update(Job).where(Job.id == job_id).values(
            status=job_status.value, finished_at=utcnow(), cancelled_at_item=first_not_done))
    return job_id


STATUSES = [ItemStatus.DONE] * 4 + [ItemStatus.FAILED] + [ItemStatus.DONE] * 12 + [ItemStatus.INTERRUPTED] * 2 + \
    [ItemStatus.DONE] * 5 + [ItemStatus.FAILED]


def test_partial_results_come_in_pages_with_the_whole_jobs_summary_on_each(reader):
    job_id = _job_with_items(STATUSES)
    whole = reader.get(f"/api/jobs/{job_id}/partial-results").json()
    assert "link" not in {k.lower() for k in reader.get(f"/api/jobs/{job_id}/partial-results").headers}
    done = [i for i, s in enumerate(STATUSES) if s is ItemStatus.DONE]
    assert [r["index"] for r in whole["results"]] == done
    assert whole["completed_items"] == len(done) and whole["total_items"] == len(STATUSES) + 3
    assert whole["completion_percent"] == round(100 * len(done) / (len(STATUSES) + 3), 1)
    assert whole["cancelled_at_item"] == 4 and whole["status"] == "partial"

    pages, url = [], f"/api/jobs/{job_id}/partial-results?limit=4"
    while url:
        answer = reader.get(url)
        assert answer.status_code == 200, answer.text
        pages.append(answer.json())
        url = answer.links.get("next", {}).get("url")
    assert len(pages) == -(-len(STATUSES) // 4)
    summary = ("status", "job_status", "completion_percent", "total_items", "completed_items", "cancelled_at_item")
    for page in pages:
        assert {k: page[k] for k in summary} == {k: whole[k] for k in summary}
    for field in ("results", "failed_items", "interrupted_items"):
        assert [e for page in pages for e in page[field]] == whole[field], field
    assert reader.get(f"/api/jobs/{job_id}/partial-results", params={"limit": 0}).status_code == 422
    assert reader.get(f"/api/jobs/{job_id}/partial-results", params={"limit": 1001}).status_code == 422
    for cursor in ("nope", _cursor(["3"]), _cursor([1, 2]), _cursor([-5]), _cursor([10**30]), _cursor([True])):
        bad = reader.get(f"/api/jobs/{job_id}/partial-results", params={"cursor": cursor})
        assert bad.status_code == 422, (cursor, bad.text)


def test_the_client_and_the_cli_follow_the_pages_of_partial_results(api_server, monkeypatch):
    from api.client import AndonClient

    statuses = [ItemStatus.DONE, ItemStatus.FAILED] * 600 + [ItemStatus.INTERRUPTED] * 3  # more than a page
    job_id = _job_with_items(statuses)
    with AndonClient(api_server) as client:
        joined = client.results(job_id)
        small_pages = client.results(job_id, page_size=7)
    assert [r["index"] for r in joined.results] == list(range(0, 1200, 2))
    assert [f["index"] for f in joined.failed_items] == list(range(1, 1200, 2))
    assert [i["index"] for i in joined.interrupted_items] == [1200, 1201, 1202]
    assert small_pages == joined and joined.completed_items == 600
    answer = subprocess.run([ANDON, "results", job_id, "--json"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "ANDON_API_URL": api_server})
    assert answer.returncode == 0, answer.stderr
    printed = json.loads(answer.stdout)
    assert len(printed["results"]) == 600 and len(printed["failed_items"]) == 600


# -- /metrics ------------------------------------------------------------------------------------------


@pytest.fixture
def own_database(db_url, redis_server, monkeypatch):
    """The collector pointed at a database of its own (the counts are exact there)."""
    from db.settings import get_settings

    monkeypatch.setenv("ANDON_DATABASE_URL", db_url)
    get_settings.cache_clear()
    yield db_url
    monkeypatch.undo()
    get_settings.cache_clear()


def _scrape(collector) -> tuple[Counter, dict]:
    jobs, histograms = Counter(), {}
    for family in collector.collect():
        if family.name == "andon_jobs":
            for sample in family.samples:
                jobs[(sample.labels["status"], sample.labels["reason"])] = sample.value
        elif family.type == "histogram":
            histograms[family.name] = {(s.name, s.labels.get("le")): round(s.value, 9) for s in family.samples}
    return jobs, histograms


def _rows(url: str) -> Counter:
    with session_scope(url) as session:
        return Counter({(status, reason or ""): n for status, reason, n in session.execute(
            select(Job.status, Job.cancellation_reason, func.count()).group_by(Job.status, Job.cancellation_reason))})


def _ended_jobs(url: str, count: int, status: JobStatus, reason: str | None, ended_ago_s: float | None,
                latency_ms: float = 3.0) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    now = utcnow()
    with session_scope(url) as session:
        for job_id in ids:
            job_rows.create_job(session, job_id, ["a"], {})
        if ended_ago_s is not None:
            finished = now - timedelta(seconds=ended_ago_s)
            requested = finished - timedelta(milliseconds=2 * latency_ms)
            session.execute(update(Job).where(Job.id.in_(ids)).values(
                status=status.value, cancellation_reason=reason, finished_at=finished,
                cancel_requested_at=requested if reason else None,
                cancel_observed_at=requested + timedelta(milliseconds=latency_ms) if reason else None))
        elif status is not JobStatus.PENDING:
            session.execute(update(Job).where(Job.id.in_(ids)).values(status=status.value))
    return ids


def _fresh_histograms(url: str, sample: int) -> dict:
    """The latency histograms computed from scratch: the newest ``sample`` cancelled jobs."""
    from api import metrics

    collector = metrics.JobMetrics()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "SAMPLE", sample)
        return _scrape(collector)[1]


def test_metrics_counts_and_latencies_follow_the_rows_scrape_after_scrape(own_database, monkeypatch):
    from api import metrics

    url = own_database
    monkeypatch.setattr(metrics, "SETTLE_S", 1.0)
    monkeypatch.setattr(metrics, "SAMPLE", 6)
    _ended_jobs(url, 4, JobStatus.CANCELLED, "timeout", 3600, latency_ms=2)
    _ended_jobs(url, 3, JobStatus.CANCELLED, "user_requested", 1800, latency_ms=40)
    _ended_jobs(url, 5, JobStatus.COMPLETED, None, 7200)
    _ended_jobs(url, 2, JobStatus.FAILED, None, 0)  # ended, not yet settled
    _ended_jobs(url, 1, JobStatus.CANCELLED, "timeout", 0, latency_ms=9)
    _ended_jobs(url, 3, JobStatus.PENDING, None, None)
    running = _ended_jobs(url, 2, JobStatus.RUNNING, None, None)
    collector = metrics.JobMetrics()
    jobs, histograms = _scrape(collector)
    assert jobs == _rows(url)
    assert histograms == _fresh_histograms(url, 6)

    # more jobs end; once they settle, the watermark moves past them (the oldest leave the sample)
    _ended_jobs(url, 2, JobStatus.CANCELLED, "resource_limit", 0, latency_ms=700)
    with session_scope(url) as session:
        session.execute(update(Job).where(Job.id == running[0]).values(
            status=JobStatus.COMPLETED.value, finished_at=utcnow()))
    time.sleep(1.2)
    _ended_jobs(url, 1, JobStatus.CANCELLED, "dependency_failed", 0, latency_ms=20)
    _ended_jobs(url, 2, JobStatus.PENDING, None, None)
    for _ in range(2):
        jobs, histograms = _scrape(collector)
        assert jobs == _rows(url)
        assert histograms == _fresh_histograms(url, 6)
    assert histograms["andon_cancel_request_to_observe_seconds"][("andon_cancel_request_to_observe_seconds_count",
                                                                  None)] == 7  # 6 settled, 1 not yet

    # a prune deletes rows: the next scrape counts again from scratch
    with session_scope(url) as session:
        old = session.scalars(select(Job.id).where(Job.status == "completed").limit(3)).all()
        job_rows.delete_jobs(session, list(old))
    metrics.rows_deleted()
    assert _scrape(collector)[0] == _rows(url)


# -- migration 0013 ---------------------------------------------------------------------------------


def test_migration_0013_copies_each_jobs_created_at_to_its_tags_and_goes_back(db_url):
    from db.migrate import downgrade, upgrade

    downgrade(db_url, "0012")
    with session_scope(db_url) as session:
        for i in range(3):
            session.execute(text(
                "INSERT INTO jobs (id, status, pipeline, documents, options, total_items, completed_items, "
                "failed_items, resumable, deferred, fence, created_at) VALUES (:id, 'completed', 'documents', "
                "'[]', '{}', 0, 0, 0, false, false, 0, :at)"), {"id": f"job-{i}", "at": utcnow() - timedelta(hours=i)})
            session.execute(text("INSERT INTO job_tags (job_id, tag) VALUES (:id, 'old'), (:id, 'older')"),
                            {"id": f"job-{i}"})
    upgrade(db_url)
    with session_scope(db_url) as session:
        pairs = session.execute(select(JobTag.created_at, Job.created_at).join(Job, Job.id == JobTag.job_id)).all()
        assert len(pairs) == 6 and all(tag_at == job_at for tag_at, job_at in pairs)
    from api import service

    with pytest.MonkeyPatch.context() as patch:
        from db.settings import get_settings

        patch.setenv("ANDON_DATABASE_URL", db_url)
        get_settings.cache_clear()
        try:
            page, cursor = service.page_jobs(service.JobFilter(tag="older"), 2)
            rest, end = service.page_jobs(service.JobFilter(tag="older"), 2, cursor)
        finally:
            patch.undo()
            get_settings.cache_clear()
    assert [job.job_id for job in page + rest] == ["job-0", "job-1", "job-2"] and end is None
    downgrade(db_url, "0012")
    upgrade(db_url)
