"""5. The dashboard: how long ``GET /ui`` takes to show its jobs table with 10,000 jobs in the database,
measured in a real browser (Playwright driving the system Chromium, as the tests do).

A real uvicorn API on the bench's database; each load is a fresh browser context (cold cache, no
cookies): from ``page.goto`` until the table holds its first page of rows (50). The first load warms
the API process and is not counted.
"""

from __future__ import annotations

import shutil
import statistics
import time
import uuid
from pathlib import Path

from bench.report import Report, Row, say
from bench.sizes import GOAL_UI_LOAD_S, Sizes, documents

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
FIGURE = "dashboard page load, {n:,} jobs in the database (median of {loads} cold loads)"


def bench_dashboard(sizes: Sizes, logs: Path, report: Report) -> None:
    from api.supervisor import api_service, free_port

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if chromium is None or sync_playwright is None:
        why = "no Chromium (apt-get install chromium)" if chromium is None else "no Playwright (pip install playwright)"
        say(f"dashboard: skipped, {why}")
        report.rows.append(Row(FIGURE.format(n=sizes.ui_jobs, loads=sizes.ui_loads), f"skipped: {why}", "—", "—",
                               f"< {GOAL_UI_LOAD_S:g} s", None, reason=why))
        return

    total = _fill(sizes.ui_jobs)
    port = free_port()
    api = api_service(port, logs / "api-dashboard.log").start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            try:
                times = [_load(browser, f"http://127.0.0.1:{port}") for _ in range(sizes.ui_loads + 1)][1:]
            finally:
                browser.close()
    finally:
        api.stop(timeout=15)
    median, worst = statistics.median(times), max(times)
    say(f"dashboard: {total:,} jobs, page load median {median * 1e3:.0f} ms, max {worst * 1e3:.0f} ms "
        f"({len(times)} cold loads)")
    report.rows.append(Row(FIGURE.format(n=total, loads=len(times)), f"{median * 1e3:.0f} ms (max {worst * 1e3:.0f})",
                           "—", "—", f"< {GOAL_UI_LOAD_S:g} s", median < GOAL_UI_LOAD_S,
                           value=round(median * 1e3, 1), unit="ms", n=len(times)))
    report.extra["dashboard"] = {"jobs": total, "median_s": median, "max_s": worst, "n": len(times)}


def _fill(target: int) -> int:
    """At least ``target`` job rows (the bulk-cancel phase leaves its own); returns how many there are."""
    from sqlalchemy import func, select

    from db import jobs as job_rows
    from db.models import Job
    from db.session import session_scope

    with session_scope() as session:
        have = session.scalar(select(func.count()).select_from(Job)) or 0
    doc = documents(1)
    for start in range(have, target, 2000):
        with session_scope() as session:
            for i in range(start, min(start + 2000, target)):
                job_rows.create_job(session, str(uuid.uuid4()), doc, {}, actor="bench-ui", tags=[f"ui-{i % 50}"])
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def _load(browser, url: str) -> float:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    try:
        page = context.new_page()
        started = time.perf_counter()
        page.goto(f"{url}/ui")
        page.locator("table.jobs tbody tr").nth(49).wait_for(timeout=30_000)
        return time.perf_counter() - started
    finally:
        context.close()
