"""What users and other services wrote is printed as written: Rich markup in a message or a document
is just text, and control characters (ANSI escapes) show as visible escapes, never reach the terminal.
Through the real `andon` CLI, against the session's stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from api.views import printable
from tests.jobs_helpers import wait_items, wait_terminal

ANDON = str(Path(sys.executable).parent / "andon")
MESSAGE = "[/] [bold]x[/bold] \x1b[31mred"
DOCUMENT = "[/] [red]sneaky[/red] text \x1b[2J here. Another sentence about foxes and dogs."
SHOWN = "[/] [bold]x[/bold] \\x1b[31mred"  # what a person sees: the markup as typed, ESC made visible


def andon(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([ANDON, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "250", **(env or {})})


@pytest.fixture(scope="module", autouse=True)
def cli_reaches_the_api(api_server):
    """The CLI's job verbs speak HTTP to the session's real API."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANDON_API_URL", api_server)
        yield


@pytest.fixture(scope="module")
def cancelled_job(worker) -> str:
    submitted = andon("submit", "--json", "--stage-delay", "0.05", DOCUMENT, *[f"Doc {i}. Fine text." for i in range(40)])
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    wait_items(job_id, 2)
    cancelled = andon("cancel", job_id, "--message", MESSAGE)
    assert cancelled.returncode == 0, cancelled.stderr
    assert wait_terminal(job_id).cancellation_message == MESSAGE
    return job_id


def assert_literal(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "MarkupError" not in done.stderr
    assert "\x1b" not in done.stdout
    return done.stdout


def test_show_prints_the_cancel_message_literally(cancelled_job):
    out = assert_literal(andon("show", cancelled_job))
    assert SHOWN in out


def test_results_print_documents_literally(cancelled_job):
    out = assert_literal(andon("results", cancelled_job))
    assert "[/] [red]sneaky[/red]" in out and "\\x1b[2J" in out


def test_ls_survives_markup_in_the_listed_jobs(cancelled_job):
    out = assert_literal(andon("ls", "--limit", "1000"))
    assert cancelled_job in out


def test_watch_prints_the_end_literally(cancelled_job):
    out = assert_literal(andon("watch", cancelled_job))
    assert f"reason: user_requested (cli): {SHOWN}" in out


def test_json_output_keeps_the_exact_text(cancelled_job):
    done = andon("show", cancelled_job, "--json")
    assert "\x1b" not in done.stdout  # JSON escapes it (\u001b); a program reads back the original
    assert json.loads(done.stdout)["cancellation_message"] == MESSAGE


def test_printable_escapes_controls_but_keeps_newlines_and_tabs():
    assert printable("a\x1b[0m\r\x07\x9b\u202e b\n\tc") == "a\\x1b[0m\\x0d\\x07\\x9b\\u202e b\n\tc"
    assert printable(None) == ""
