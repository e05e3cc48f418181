"""How the CLI shows jobs and partial results to a person (Rich), or to a program (--json).

Whatever a user or another service wrote (messages, errors, results, tags, actors, ids, stage names)
goes through :func:`literal` (or :func:`printable`): Rich never reads it as markup, so ``[/]`` is
just text, and control characters (an ANSI escape, a carriage return that rewrites the line, a bidi
override) are shown as visible escapes such as ``\\x1b`` instead of reaching the terminal.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

#: C0 and C1 controls except tab and newline, DEL, and the Unicode bidi embeddings/overrides/isolates.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible_escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(value: Any) -> str:
    """``value`` as a string a terminal shows as written: control characters become visible
    escapes (``\\x1b``), newline and tab stay. Not markup-safe by itself: print it with
    :func:`literal`, ``markup=False`` or as a ``Text``."""
    return _UNPRINTABLE.sub(_visible_escape, "" if value is None else str(value))


def literal(value: Any, style: str = "") -> Text:
    """User-written ``value`` as a Rich ``Text``: printed literally, never parsed as markup."""
    return Text(printable(value), style=style)

STATUS_STYLE = {"completed": "green", "cancelled": "yellow", "failed": "red", "cancelling": "magenta",
                "running": "cyan", "pending": "white"}


def as_data(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [as_data(v) for v in value]
    return value


def print_json(value: Any) -> None:
    print(json.dumps(as_data(value), indent=2))


def _status(status: str) -> Text:
    return literal(status, STATUS_STYLE.get(status, "white"))


def print_job(console: Console, job: Any) -> None:
    job = as_data(job)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("job", literal(job["job_id"]))
    if job.get("pipeline"):
        table.add_row("pipeline", literal(job["pipeline"]))
    table.add_row("status", _status(job["status"]))
    if job.get("cancellation_reason"):
        table.add_row("reason", literal(job["cancellation_reason"]))
        table.add_row("source", literal(job.get("cancellation_source") or "-"))
        table.add_row("message", literal(job.get("cancellation_message") or "-"))
    table.add_row("items", literal(f"{job['completed_items']} done, {job.get('failed_items', 0)} failed, "
                                   f"{job['total_items']} total"))
    if job.get("tags"):
        table.add_row("tags", literal(", ".join(job["tags"])))
    for key in ("created_at", "started_at", "cancel_requested_at", "cancel_observed_at", "finished_at"):
        if job.get(key):
            table.add_row(key.replace("_", " "), literal(job[key]))
    latency = job.get("cancel_latency") or {}
    if latency.get("request_to_observe_ms") is not None:
        table.add_row("cancel latency", f"observed {latency['request_to_observe_ms']:.1f} ms after the request, "
                                        f"stopped {latency['observe_to_stop_ms']:.1f} ms later")
    if job.get("error"):
        table.add_row("error", literal(job["error"]))
    usage = job.get("usage")
    if usage:
        table.add_row("llm usage", literal(f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion "
                                           f"tokens over {usage['items']} items ({usage['cut_short_items']} cut short"
                                           f"{', estimated' if usage['estimated'] else ''})"))
    if job.get("resumed_from"):
        table.add_row("resumed from", literal(job["resumed_from"]))
    if job.get("resumed_by"):
        table.add_row("resumed by", literal(job["resumed_by"]))
    console.print(table)


def print_jobs(console: Console, jobs: list[Any]) -> None:
    table = Table("job", "status", "reason", "done", "failed", "total", "created")
    for job in map(as_data, jobs):
        table.add_row(literal(job["job_id"]), _status(job["status"]), literal(job.get("cancellation_reason") or ""),
                      str(job["completed_items"]), str(job.get("failed_items", 0)), str(job["total_items"]),
                      literal(job["created_at"][:19]))
    console.print(table)


def print_pipelines(console: Console, pipelines: list[Any]) -> None:
    table = Table("pipeline", "stages", "concurrency", "queue", "description")
    for p in (as_data(p) for p in pipelines):
        table.add_row(escape(p["name"]), escape(" → ".join(p["stages"])), str(p["concurrency"]),
                      escape(p["queue"] or "-"), escape(p["description"] or ""))
    console.print(table)


def print_partial_results(console: Console, results: Any) -> None:
    results = as_data(results)
    console.print(Text.assemble(
        "Partial results: ", literal(results["status"], "bold"),
        literal(f" — {results['completed_items']} of {results['total_items']} items "
                f"({results['completion_percent']}%)"
                + (f", cancelled at item {results['cancelled_at_item']}"
                   if results.get("cancelled_at_item") is not None else ""))))
    rows = []
    for item in results["results"]:
        if "result" in item:
            summary, keywords = json.dumps(item["result"]), ""
        else:
            summary, keywords = str(item.get("summary", "")), ", ".join(map(str, item.get("keywords", [])))
        rows.append((item["index"], literal(keywords),
                     literal(summary if len(summary) <= 70 else summary[:67] + "...")))
    for item in results["failed_items"]:
        rows.append((item["index"], literal("failed", "red"), literal(f"{item['stage']}: {item['error']}", "red")))
    for item in results.get("interrupted_items", []):
        rows.append((item["index"], literal("interrupted", "yellow"), literal(f"at {item['stage']}", "yellow")))
    table = Table("#", "keywords", "summary")
    for index, keywords, summary in sorted(rows, key=lambda row: row[0]):
        table.add_row(str(index), keywords, summary)
    console.print(table)
