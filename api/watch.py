"""``andon watch ID``: a live progress bar fed by the job's Server-Sent Events.

Ctrl-C stops watching, never the job. The final lines (status, reason, partial results) are plain
text so scripts and narrow terminals read them the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from api.client import AndonAPIError, AndonClient
from api.views import literal, printable


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def follow(job_id: str, reopen_after_s: float = 0.5, away_for_s: float = 60.0) -> Iterator[tuple[str, dict[str, Any]]]:
    """The job's events from the API (ANDON_API_URL, ANDON_API_TOKEN), as ``(event, data)``, until
    ``end``. A stream the API closed before the job ended (a restart, its own time bound) is opened
    again, for up to ``away_for_s`` of the API not answering; each stream starts with the job's
    history, so what was already given is not given twice. An API never reached is an error at once."""
    given: set[tuple] = set()
    away_since: float | None = None
    with AndonClient(client_name="cli") as api:
        while True:
            try:
                for event in api.events(job_id):
                    away_since = None
                    key = _identity(event.event, event.data)
                    if key is not None and key in given:
                        continue
                    if key is not None:
                        given.add(key)
                    yield event.event, event.data
                    if event.event == "end":
                        return
            except AndonAPIError as exc:
                if exc.status is not None or not given:
                    raise
                away_since = away_since or time.monotonic()
                if time.monotonic() - away_since > away_for_s:
                    raise
            time.sleep(reopen_after_s)


def _identity(event: str, data: dict[str, Any]) -> tuple | None:
    """What makes a history entry the same one in the next stream (None: a live position, never repeated)."""
    if event == "item":
        return event, data.get("index"), data.get("status")
    if event in ("progress", "open"):
        return None
    return event, data.get("at"), data.get("actor"), data.get("reason")


def summary_lines(end: dict[str, Any]) -> list[str]:
    lines = [f"status: {end['status']}"]
    if end.get("reason"):
        why = f"reason: {end['reason']} ({end.get('source') or '-'})"
        lines.append(why + (f": {end['message']}" if end.get("message") else ""))
    if end.get("error"):
        lines.append(f"error: {end['error']}")
    total = end["total_items"] or 0
    percent = round(100 * end["completed_items"] / total, 1) if total else 0.0
    lines.append(f"partial results: {end['completed_items']} of {total} items done, "
                 f"{end['failed_items']} failed ({percent}%)")
    return lines


def watch_job(job_id: str, console: Console, json_lines: bool = False) -> dict[str, Any] | None:
    """Follow until the job is terminal; return its ``end`` event (None if interrupted)."""
    if json_lines:
        for event, data in follow(job_id):
            print(json.dumps({"event": event, **data}), flush=True)
            if event == "end":
                return data
        return None
    # markup=False: the description carries stage names and reasons that pipelines and users wrote
    columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn()]
    end = None
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(printable(f"job {job_id[:8]}"), total=None)
        for event, data in follow(job_id):
            if "total_items" in data:
                bar.update(task, total=data["total_items"],
                           completed=data["completed_items"] + data.get("failed_items", 0))
            if event == "progress":
                bar.update(task, description=printable(f"job {job_id[:8]} item {data['item']} {data['stage']}"))
            elif event == "cancel_requested":
                bar.update(task, description=printable(f"job {job_id[:8]} cancelling ({data['reason']})"))
            elif event == "end":
                end = data
                break
    if end is not None:
        for line in summary_lines(end):
            console.print(literal(line), highlight=False, soft_wrap=True)
    return end
