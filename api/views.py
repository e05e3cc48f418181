"""How the CLI shows jobs and partial results to a person (Rich), or to a program (--json)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

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


def _status(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def print_job(console: Console, job: Any) -> None:
    job = as_data(job)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("job", job["job_id"])
    table.add_row("status", _status(job["status"]))
    if job.get("cancellation_reason"):
        table.add_row("reason", job["cancellation_reason"])
        table.add_row("source", job.get("cancellation_source") or "-")
        table.add_row("message", job.get("cancellation_message") or "-")
    table.add_row("items", f"{job['completed_items']} done, {job.get('failed_items', 0)} failed, "
                           f"{job['total_items']} total")
    if job.get("tags"):
        table.add_row("tags", ", ".join(job["tags"]))
    for key in ("created_at", "started_at", "cancel_requested_at", "cancel_observed_at", "finished_at"):
        if job.get(key):
            table.add_row(key.replace("_", " "), job[key])
    latency = job.get("cancel_latency") or {}
    if latency.get("request_to_observe_ms") is not None:
        table.add_row("cancel latency", f"observed {latency['request_to_observe_ms']:.1f} ms after the request, "
                                        f"stopped {latency['observe_to_stop_ms']:.1f} ms later")
    if job.get("error"):
        table.add_row("error", job["error"])
    console.print(table)


def print_jobs(console: Console, jobs: list[Any]) -> None:
    table = Table("job", "status", "reason", "done", "failed", "total", "created")
    for job in map(as_data, jobs):
        table.add_row(job["job_id"], _status(job["status"]), job.get("cancellation_reason") or "",
                      str(job["completed_items"]), str(job.get("failed_items", 0)), str(job["total_items"]),
                      job["created_at"][:19])
    console.print(table)


def print_pipelines(console: Console, pipelines: list[Any]) -> None:
    table = Table("pipeline", "stages", "concurrency", "queue", "description")
    for p in (as_data(p) for p in pipelines):
        table.add_row(escape(p["name"]), escape(" → ".join(p["stages"])), str(p["concurrency"]),
                      escape(p["queue"] or "-"), escape(p["description"] or ""))
    console.print(table)


def print_partial_results(console: Console, results: Any) -> None:
    results = as_data(results)
    console.print(f"Partial results: [bold]{results['status']}[/] — {results['completed_items']} of "
                  f"{results['total_items']} items ({results['completion_percent']}%)"
                  + (f", cancelled at item {results['cancelled_at_item']}"
                     if results.get("cancelled_at_item") is not None else ""))
    rows = []
    for item in results["results"]:
        summary = item.get("summary", "") if "result" not in item else json.dumps(item["result"])
        rows.append((item["index"], ", ".join(item.get("keywords", [])),
                     summary if len(summary) <= 70 else summary[:67] + "..."))
    for item in results["failed_items"]:
        rows.append((item["index"], "[red]failed[/]", f"[red]{escape(item['stage'])}: {escape(item['error'] or '')}[/]"))
    for item in results.get("interrupted_items", []):
        rows.append((item["index"], "[yellow]interrupted[/]", f"[yellow]at {escape(item['stage'])}[/]"))
    table = Table("#", "keywords", "summary")
    for index, keywords, summary in sorted(rows, key=lambda row: row[0]):
        table.add_row(str(index), keywords, summary)
    console.print(table)
