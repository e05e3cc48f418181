"""The job dashboard (/ui), its live feed (/api/events) and the paged job list, against the real API
(uvicorn) and the real worker — the page itself driven in a real browser: Playwright with Debian's
Chromium (`apt-get install chromium`; .ci/run installs it). Without Chromium or Playwright the
browser tests skip, saying why; the HTTP tests still run.

Set ANDON_UI_SCREENSHOT=path/to.png to save the job view of a cancelled job (docs/dashboard.png).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid

import httpx
import pytest

from api import service
from api.supervisor import api_service, free_port
from api.watch import parse_sse
from tests.conftest import HOME
from tests.jobs_helpers import docs, job_row, submit, wait_items, wait_status, wait_terminal
from tests.procs import wait_for

CHROMIUM = os.environ.get("ANDON_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
TOKENS = {"acme": "acme-token", "globex": "globex-token"}
WAIT_MS = 20_000


def tag() -> str:
    return f"ui-{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------------------------------------
# The page and its assets, the paged list, the count (HTTP only)


def test_the_dashboard_is_served_from_the_package_with_no_cdn(api_client):
    page = api_client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert api_client.get("/ui/jobs/some-id").text == page.text  # one page, two views
    for asset, kind in [("app.js", "text/javascript"), ("app.css", "text/css")]:
        answer = api_client.get(f"/ui/static/{asset}")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind)
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", answer.text), f"{asset} loads from elsewhere"
        assert api_client.get(f"/ui/static/{asset}", headers={"If-None-Match": answer.headers["etag"]}).status_code == 304
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text)
    for bad in ["nope.js", "..%2Fapp.py", "index.html"]:
        assert api_client.get(f"/ui/static/{bad}").status_code == 404


def test_the_job_list_pages_with_a_link_header_and_keeps_its_json_list(api_client):
    label = tag()
    ids = [submit(1, tags=[label]) for _ in range(5)]
    for job_id in ids:
        wait_terminal(job_id)
    seen, url, pages = [], f"/api/jobs?tag={label}&limit=2", 0
    while url:
        answer = api_client.get(url)
        assert answer.status_code == 200 and isinstance(answer.json(), list)
        seen += [job["job_id"] for job in answer.json()]
        link = answer.headers.get("link")
        url = re.match(r'<([^>]+)>; rel="next"', link).group(1) if link else None
        pages += 1
    assert pages == 3 and seen == list(reversed(ids))  # newest first, each job once
    assert api_client.get("/api/jobs", params={"tag": label, "limit": 5}).headers.get("link") is None
    assert api_client.get("/api/jobs", params={"cursor": "garbage!"}).status_code == 422
    assert api_client.get("/api/jobs/count", params={"tag": label}).json() == {"count": 5}
    assert api_client.get("/api/jobs/count", params={"tag": label, "unfinished": True}).json() == {"count": 0}
    assert api_client.get("/api/jobs", params={"tag": label, "pipeline": "user-sync"}).json() == []
    assert len(api_client.get("/api/jobs", params={"tag": label, "pipeline": "documents"}).json()) == 5


def test_the_job_list_filters_by_reason_and_by_the_job_resumed(api_client):
    label = tag()
    job_id = submit(40, stage_delay_s=0.03, tags=[label])
    wait_items(job_id, 2)
    service.cancel_job(job_id, "timeout")
    wait_terminal(job_id)
    new_id = service.resume_job(job_id).job_id
    by_reason = api_client.get("/api/jobs", params={"tag": label, "reason": "timeout"}).json()
    assert [j["job_id"] for j in by_reason] == [job_id]
    assert api_client.get("/api/jobs", params={"tag": label, "reason": "user_requested"}).json() == []
    assert [j["job_id"] for j in api_client.get("/api/jobs", params={"resumed_from": job_id}).json()] == [new_id]
    assert api_client.get("/api/jobs", params={"reason": "bored"}).status_code == 422
    wait_terminal(new_id)


# ---------------------------------------------------------------------------------------------
# GET /api/events: every event the caller may see


def read_every(url: str, until, headers=None, timeout: float = 30, on_open=None) -> list[tuple[str, dict]]:
    """Events from ``url``/api/events until ``until(events)`` is true."""
    out: list[tuple[str, dict]] = []
    with httpx.stream("GET", f"{url}/api/events", headers=headers, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        for event, data in parse_sse(response.iter_lines()):
            out.append((event, data))
            if event == "open" and on_open:
                on_open()
            if until(out):
                return out
    raise AssertionError(f"stream ended early: {out}")


def test_every_event_of_every_job_arrives_on_one_stream(api_server):
    label = tag()
    ids: list[str] = []

    def start_two():
        ids.extend(submit(3, stage_delay_s=0.02, tags=[label]) for _ in range(2))

    def both_done(events):
        return sum(1 for e, d in events if e == "completed" and d["job_id"] in ids) == 2

    events = read_every(api_server, both_done, on_open=start_two)
    assert events[0][0] == "open"
    for job_id in ids:
        mine = [(e, d) for e, d in events if d.get("job_id") == job_id]
        kinds = [e for e, _ in mine]
        assert kinds[:2] == ["submitted", "started"] and kinds[-1] == "completed", kinds
        assert [d["index"] for e, d in mine if e == "item"] == [0, 1, 2]
        assert mine[-1][1]["job_status"] == "completed" and mine[-1][1]["completed_items"] == 3


@pytest.fixture(scope="module")
def tenant_api(worker):
    """A dedicated uvicorn with tenant tokens (the session's API has none)."""
    port = free_port()
    service_ = api_service(port, HOME / "logs" / "api-tenants.log",
                           env={"ANDON_API_TOKENS": json.dumps(TOKENS)}).start()
    yield f"http://127.0.0.1:{port}"
    service_.stop(timeout=15)


def _submit_as(url: str, tenant: str, n: int, label: str, delay: float = 0.0) -> str:
    answer = httpx.post(f"{url}/api/jobs", headers={"Authorization": f"Bearer {TOKENS[tenant]}"},
                        json={"documents": docs(n), "options": {"stage_delay_s": delay}, "tags": [label]})
    assert answer.status_code == 202, answer.text
    return answer.json()["job_id"]


def test_the_event_stream_shows_a_tenant_only_its_own_jobs(tenant_api):
    label = tag()
    assert httpx.get(f"{tenant_api}/api/events").status_code == 401
    ids: dict[str, str] = {}

    def start():
        ids["globex"] = _submit_as(tenant_api, "globex", 2, label)
        ids["acme"] = _submit_as(tenant_api, "acme", 2, label)

    events = read_every(tenant_api, lambda ev: any(e == "completed" and d["job_id"] == ids.get("acme") for e, d in ev),
                        headers={"Authorization": f"Bearer {TOKENS['acme']}"}, on_open=start)
    wait_terminal(ids["globex"])
    seen = {d.get("job_id") for _, d in events}
    assert ids["acme"] in seen and ids["globex"] not in seen


# ---------------------------------------------------------------------------------------------
# In a real browser


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("browser tests need Chromium: apt-get install -y chromium (or set ANDON_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need Playwright for Python: pip install -e '.[dev]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    contexts = []

    def open_(url: str, path: str = "/ui"):
        context = browser.new_context(base_url=url, viewport={"width": 1440, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.errors = errors
        page.goto(path)
        return page

    yield open_
    for context in contexts:
        context.close()


def live(page) -> None:
    """Wait for the page's feed to be open, and mark the document: a reload would lose the mark."""
    page.locator("#live.on").wait_for()
    page.evaluate("window.__notReloaded = true")


def not_reloaded(page) -> None:
    assert page.evaluate("window.__notReloaded === true"), "the page was reloaded"
    assert not page.errors, page.errors


def row(page, job_id: str):
    return page.locator(f'tr[data-job-id="{job_id}"]')


def test_the_table_lists_jobs_and_updates_live_as_a_job_progresses(api_server, open_page):
    label = tag()
    earlier = submit(2, tags=[label])
    wait_terminal(earlier)
    page = open_page(api_server, f"/ui?tag={label}")
    row(page, earlier).locator(".badge", has_text="completed").wait_for()
    live(page)

    job_id = submit(8, stage_delay_s=0.1, tags=[label])  # ~0.3 s an item
    row(page, job_id).wait_for()  # it appears without a reload
    row(page, job_id).locator(".badge", has_text="running").wait_for()
    page.wait_for_function(  # a count in between: the bar moves as items end
        """id => /^[1-7]\\/8/.test(document.querySelector(`tr[data-job-id="${id}"] .progress .label`).textContent)""",
        arg=job_id)
    row(page, job_id).locator(".badge", has_text="completed").wait_for()
    assert row(page, job_id).locator(".progress .label").inner_text().startswith("8/8")
    assert page.locator("tbody tr").count() == 2
    not_reloaded(page)


def test_a_cancel_from_the_page_ends_the_job_with_the_chosen_reason(api_server, open_page):
    label = tag()
    job_id = submit(60, stage_delay_s=0.05, tags=[label])
    wait_items(job_id, 2)
    page = open_page(api_server, f"/ui?tag={label}")
    live(page)
    row(page, job_id).get_by_role("button", name="Cancel", exact=True).click()
    page.locator("#cancel-reason").select_option("resource_limit")
    page.locator("#cancel-message").fill("stopped from the dashboard")
    page.locator("#cancel-confirm").click()
    row(page, job_id).locator(".badge", has_text="cancelled").wait_for()
    row(page, job_id).locator("td.reason", has_text="resource_limit").wait_for()
    job = wait_terminal(job_id)
    assert (job.status, job.cancellation_reason, job.cancellation_source) == ("cancelled", "resource_limit", "api")
    assert job.cancellation_message == "stopped from the dashboard"
    assert "resource_limit" in page.locator("#banner").inner_text()
    not_reloaded(page)


def test_bulk_cancel_by_tag_says_how_many_jobs_it_touches(api_server, open_page):
    label, other = tag(), tag()
    ids = [submit(60, stage_delay_s=0.05, tags=[label]) for _ in range(3)]
    spared = submit(60, stage_delay_s=0.05, tags=[other])
    page = open_page(api_server, f"/ui?tag={label}")
    live(page)
    for job_id in ids:
        row(page, job_id).wait_for()
    page.get_by_role("button", name="Cancel matching…").click()
    page.locator("#cancel-dialog[open]").wait_for()
    assert "cancels 3 unfinished jobs with tag " + label in page.locator("#cancel-what").inner_text()
    page.get_by_role("button", name="Cancel 3 jobs").click()
    page.locator("#banner", has_text="3 matched").wait_for()
    for job_id in ids:
        row(page, job_id).locator(".badge", has_text="cancelled").wait_for()
        assert wait_terminal(job_id).cancellation_reason == "user_requested"
    assert job_row(spared).status in ("pending", "running")
    service.cancel_job(spared)
    wait_terminal(spared)
    not_reloaded(page)


@pytest.fixture(scope="module")
def cancelled_job(worker):
    """A job cancelled half-way (user_requested), with one empty document (failed at parse)."""
    items = docs(24)
    items[1] = "   "
    job_id = submit(documents=items, stage_delay_s=0.05, tags=["nightly-batch"])
    wait_items(job_id, 8)
    service.cancel_job(job_id, message="budget reached for tonight")
    wait_terminal(job_id)
    return job_id


def test_the_partial_results_of_a_cancelled_job_are_shown(api_server, open_page, cancelled_job):
    job = job_row(cancelled_job)
    page = open_page(api_server, f"/ui/jobs/{cancelled_job}")
    page.locator(".job-head .badge", has_text="cancelled").wait_for()
    page.locator(".results .summary", has_text=f"{job.completed_items} of 24 items done").wait_for()
    assert page.locator(".items-results tbody tr").count() == job.completed_items
    failed = page.locator(".items-failed tbody tr")
    assert failed.count() == 1 and failed.locator("td").nth(1).inner_text() == "parse"
    page.locator(".timeline .ev-cancelled").wait_for()
    kinds = page.locator(".timeline .ev-kind").all_inner_texts()
    assert kinds.index("cancel requested") < kinds.index("cancel observed") < kinds.index("cancelled")
    assert "budget reached for tonight" in page.locator(".facts").inner_text()
    page.locator("#live.on").wait_for()
    if os.environ.get("ANDON_UI_SCREENSHOT"):
        page.wait_for_timeout(300)
        page.screenshot(path=os.environ["ANDON_UI_SCREENSHOT"], full_page=True)
    assert not page.errors, page.errors


def test_resume_from_the_page_runs_what_was_not_done(api_server, open_page, cancelled_job):
    page = open_page(api_server, f"/ui/jobs/{cancelled_job}")
    live(page)
    page.get_by_role("button", name="Resume", exact=True).click()
    page.locator("#banner", has_text="resumed as").wait_for()
    resumed = wait_for(lambda: service.list_jobs(resumed_from=cancelled_job), 10, what="the resumed job")[0]
    chain_link = page.locator(".chain a", has_text=resumed.job_id[:8])
    chain_link.wait_for()
    assert wait_terminal(resumed.job_id).status == "completed"
    chain_link.click()  # the new job's view, in the same page
    page.locator(".job-head .badge", has_text="completed").wait_for()
    page.locator(".results .summary", has_text="23 of 24 items done").wait_for()
    page.locator(".timeline .ev-resumed").wait_for()
    not_reloaded(page)


def test_a_tenant_token_sees_only_its_jobs(tenant_api, open_page):
    label = tag()
    acme = _submit_as(tenant_api, "acme", 2, label)
    globex = _submit_as(tenant_api, "globex", 2, label)
    page = open_page(tenant_api, f"/ui?tag={label}")
    page.locator("#token-dialog[open]").wait_for()  # the API said 401: the page asks for a token
    page.locator("#token-input").fill(TOKENS["acme"])
    page.get_by_role("button", name="Use token").click()
    row(page, acme).wait_for()
    live(page)
    assert row(page, globex).count() == 0
    assert page.evaluate("sessionStorage.getItem('andon.token')") == TOKENS["acme"]
    assert TOKENS["acme"] not in page.url
    later_globex = _submit_as(tenant_api, "globex", 1, label)
    later_acme = _submit_as(tenant_api, "acme", 1, label)
    row(page, later_acme).wait_for()  # the live feed brings the tenant's new job...
    wait_terminal(later_globex)
    assert row(page, later_globex).count() == 0 and row(page, globex).count() == 0  # ...and never another's
    assert page.locator("tbody tr").count() == 2
    for job_id in (acme, globex, later_acme):
        wait_terminal(job_id)
    not_reloaded(page)


def test_the_cancel_dialog_shows_the_apis_error(api_server, open_page):
    label = tag()
    job_id = submit(60, stage_delay_s=0.05, tags=[label])
    wait_status(job_id, "running")
    page = open_page(api_server, f"/ui?tag={label}")
    live(page)
    row(page, job_id).get_by_role("button", name="Cancel", exact=True).click()
    service.cancel_job(job_id)  # someone else was faster
    wait_terminal(job_id)
    page.locator("#cancel-confirm").click()
    page.locator("#cancel-error", has_text="already").wait_for()
    page.get_by_role("button", name="Back").click()
    row(page, job_id).locator(".badge", has_text="cancelled").wait_for()
    not_reloaded(page)

