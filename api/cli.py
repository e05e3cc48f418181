"""The ``andon`` command: the embedded stack, and jobs from the terminal.

Job verbs (``submit``, ``ls``, ``show``, ``cancel``, ``results``, ``resume``, ``watch``,
``pipelines``) speak HTTP to ``ANDON_API_URL`` with ``ANDON_API_TOKEN``, through :mod:`api.client`,
like ``kubectl`` or ``temporal``: no database or Redis credentials on a laptop, and the server
enforces tenancy. They send ``X-Andon-Client: cli``, so cancels are recorded with source ``cli``.
Local verbs (``up``, ``worker``, ``api``, ``flower``, ``reap``, ``demo``) run here. A user's mistake
(unknown job, bad reason, job already finished, API not running) prints one line on stderr and
exits non-zero.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from api import views
from api.client import AndonAPIError, AndonClient
from db.settings import (
    DEFAULT_ALLOWED_HOSTS,
    DEFAULT_API_PORT,
    DEFAULT_FLOWER_PORT,
    DEFAULT_REDIS_PORT,
    MAX_PRUNE_AGE_S,
    get_settings,
)
from db.vocabulary import CancellationReason, JobStatus
from tasks.errors import AndonError
from tasks.tags import check_tags

cli = typer.Typer(
    name="andon", help="Structured cancellation for Celery AI pipelines.", no_args_is_help=True,
    pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None,
)
console = Console()



class UsageMistake(AndonError):
    """The command line itself is wrong (exit 2, like any usage error)."""

    exit_code = 2


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _tenant() -> str | None:
    """With tenants configured, the CLI acts as the tenant its ANDON_API_TOKEN belongs to (the admin
    token acts across tenants)."""
    settings = get_settings()
    if not settings.api_tokens or settings.is_admin(settings.api_token):
        return None
    tenant = settings.tenant_for(settings.api_token)
    if tenant is None:
        raise AndonError("ANDON_API_TOKEN belongs to no tenant in ANDON_API_TOKENS")
    return tenant


def _api() -> AndonClient:
    """The API the job verbs speak to: ANDON_API_URL (else the embedded stack's), ANDON_API_TOKEN."""
    return AndonClient(client_name="cli")


def _choice(value: str | None, enum: type, what: str):
    if value is None:
        return None
    try:
        return enum(value)
    except ValueError:
        raise UsageMistake(f"unknown {what} {value!r} (choose from {', '.join(e.value for e in enum)})")


@cli.command()
def up(
    api_port: Annotated[int, typer.Option(help="API port.")] = DEFAULT_API_PORT,
    flower_port: Annotated[int, typer.Option(help="Flower port.")] = DEFAULT_FLOWER_PORT,
    redis_port: Annotated[int, typer.Option(help="Embedded Redis port.")] = DEFAULT_REDIS_PORT,
    concurrency: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 2,
) -> None:
    """Run the embedded stack in the foreground (Redis, worker, API, Flower); Ctrl-C stops it all."""
    from api.stack import Stack
    from tasks import policy, registry

    registry.load_configured()  # a bad ANDON_PIPELINES (or ANDON_POLICY) is one line here, before anything starts
    policy.check_global()
    stack = Stack(api_port=api_port, flower_port=flower_port, redis_port=redis_port, concurrency=concurrency)
    stopping = threading.Event()

    def on_signal(signum, _frame):
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with console.status("Starting Redis, migrations, worker, API and Flower..."):
        stack.start()
    user, _, password = stack.flower_auth.partition(":")
    console.print(f"andon is up (home {stack.home})")
    console.print(f"  API     {stack.api_url}   (docs {stack.api_url}/docs)")
    console.print(f"  jobs    {stack.api_url}/ui   (the dashboard)")
    console.print(f"  Flower  {stack.flower_url}   (user {user}, password {password})")
    console.print(f"  Redis   {stack.redis_url}")
    console.print(f"  logs    {stack.logs}")
    console.print("Press Ctrl-C to stop.", highlight=False)
    sys.stdout.flush()
    try:
        while not stopping.is_set():
            for name, proc in list(stack.procs.items()):
                if proc.poll() is not None:
                    console.print(f"[red]{name} exited with code {proc.returncode}; stopping[/]")
                    stopping.set()
            stopping.wait(0.5)
    finally:
        console.print("Stopping (warm shutdown: running jobs stop at their next checkpoint)...")
        stack.stop()
        console.print("Stopped.")


@cli.command()
def demo(
    documents: Annotated[int, typer.Option(min=3, max=1000)] = 30,
    stage_delay: Annotated[float, typer.Option(min=0.0, help="Simulated seconds per stage.")] = 0.1,
    json_out: JsonOpt = False,
) -> None:
    """Submit a job, cancel it a third of the way in, and print what it kept."""
    from api.demo import run_demo

    _writes_rows_here()
    outcome = run_demo(Console(stderr=True) if json_out else console, documents, stage_delay)
    if json_out:
        views.print_json(outcome)


@cli.command()
def submit(
    items: Annotated[Optional[list[str]], typer.Argument(help="Items (each a string; see --json-items).")] = None,
    pipeline: Annotated[str, typer.Option(help="The pipeline to run (see `andon pipelines`).")] = "documents",
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="One item per line ('-': stdin).")] = None,
    items_file: Annotated[Optional[Path], typer.Option(help="One JSON item per line (JSON Lines).")] = None,
    json_items: Annotated[bool, typer.Option("--json-items", help="Parse each ITEM as JSON.")] = False,
    option: Annotated[Optional[list[str]], typer.Option(help="A job option KEY=VALUE (VALUE as JSON if it parses; "
                                                                "repeatable).")] = None,
    stage_delay: Annotated[float, typer.Option(min=0.0, help="Simulated seconds per stage (documents).")] = 0.0,
    deadline: Annotated[Optional[float], typer.Option(min=0.001, help="Cancel with 'timeout' after this many seconds.")] = None,
    parent: Annotated[Optional[str], typer.Option(help="Run after this job completes.")] = None,
    tag: Annotated[Optional[list[str]], typer.Option(help="A label to find or cancel the job by (repeatable).")] = None,
    supersede_key: Annotated[Optional[str], typer.Option(help="Cancel your unfinished jobs submitted with this key "
                                                              "(the newest wins).")] = None,
    idempotency_key: Annotated[Optional[str], typer.Option(help="Retry-safe: the same key prints the first "
                                                                "submit's job again (24 h).")] = None,
    callback_url: Annotated[Optional[str], typer.Option(help="POST the job here, signed, when it ends "
                                                             "(a host in ANDON_WEBHOOK_HOSTS).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Submit a job: a pipeline over ITEMS (or a file of them)."""
    values: list[Any] = [_json_item(item, f"item {i + 1}") for i, item in enumerate(items or [])] if json_items \
        else list(items or [])
    if file is not None:
        text = sys.stdin.read() if str(file) == "-" else _read(file)
        values += [line for line in text.splitlines() if line.strip()]
    if items_file is not None:
        values += [_json_item(line, f"{items_file} line {n}")
                   for n, line in enumerate(_read(items_file).splitlines(), 1) if line.strip()]
    if not values:
        raise UsageMistake("no items: pass them as arguments, with --file or with --items-file")
    options = dict(_option(text) for text in option or [])
    if stage_delay:
        options["stage_delay_s"] = stage_delay
    check_tags(tag or [])  # the rule's own words, before a round trip
    extra = {"supersede_key": supersede_key} if supersede_key else {}
    with _api() as api:
        answer = api.submit(values, pipeline=pipeline, options=options or None, deadline_s=deadline,
                            parent_job_id=parent, tags=tag or None, callback_url=callback_url,
                            idempotency_key=idempotency_key, **extra)
    if json_out:
        views.print_json(answer)
    else:
        print(answer.job_id)


StepsFile = Annotated[Optional[Path], typer.Option("--file", "-f", help="The whole request as JSON, as the HTTP "
                                                                        "API takes it ('-': stdin).")]
IdempotencyKeyOpt = Annotated[Optional[str], typer.Option(help="Retry-safe: the same key prints the first "
                                                               "answer again (24 h).")]


def _request_file(file: Path) -> Any:
    return _json_item(sys.stdin.read() if str(file) == "-" else _read(file), str(file))


@cli.command()
def chain(
    step: Annotated[Optional[list[str]], typer.Option("--step", "-s", help="A job, as a JSON submit body "
                                                                          "(repeatable, in order).")] = None,
    file: StepsFile = None,
    idempotency_key: IdempotencyKeyOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run jobs one after another; each starts when the one before completes, and if one fails or is
    cancelled the rest end dependency_failed. Prints the job ids in order.

    e.g. andon chain --step '{"documents": ["a", "b"]}' --step '{"pipeline": "p", "items": [1, 2]}'
    """
    if bool(step) == (file is not None):
        raise UsageMistake("give the jobs with --step JSON (repeatable) or --file F.json, not both")
    data = _request_file(file) if file is not None else \
        {"jobs": [_json_item(text, f"--step {n}") for n, text in enumerate(step or [], 1)]}
    with _api() as api:
        answer = api.chain(data.get("jobs") if isinstance(data, dict) else data, idempotency_key=idempotency_key)
    if json_out:
        views.print_json(answer)
    else:
        print("\n".join(answer.job_ids))


@cli.command()
def chord(
    header: Annotated[Optional[list[str]], typer.Option("--header", help="A job run in parallel, as a JSON "
                                                                        "submit body (repeatable).")] = None,
    body_job: Annotated[Optional[str], typer.Option("--body", help="The job run after every header job "
                                                                   "completed, as a JSON submit body.")] = None,
    file: StepsFile = None,
    idempotency_key: IdempotencyKeyOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run header jobs in parallel, then a body job once they all completed (if one fails or is
    cancelled, the body ends dependency_failed). Prints the header ids, then the body's id last.

    e.g. andon chord --header '{"documents": ["a"]}' --header '{"documents": ["b"]}' --body '{"documents": ["c"]}'
    """
    if (file is not None) == bool(header or body_job):
        raise UsageMistake("give --header JSON (repeatable) and --body JSON, or --file F.json")
    if file is not None:
        data = _request_file(file)
    else:
        if not header or body_job is None:
            raise UsageMistake("a chord needs at least one --header and a --body")
        data = {"header": [_json_item(text, f"--header {n}") for n, text in enumerate(header, 1)],
                "body": _json_item(body_job, "--body")}
    if not isinstance(data, dict):
        raise UsageMistake("a chord file holds {\"header\": [...], \"body\": {...}}")
    with _api() as api:
        answer = api.chord(data.get("header"), data.get("body"), idempotency_key=idempotency_key)
    if json_out:
        views.print_json(answer)
    else:
        print("\n".join(answer.job_ids))


def _json_item(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageMistake(f"{where} is not JSON: {exc}") from None


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageMistake(f"--option {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


@cli.command()
def pipelines(json_out: JsonOpt = False) -> None:
    """List the pipelines this installation can run (built-in and ANDON_PIPELINES)."""
    with _api() as api:
        known = api.pipelines()
    if json_out:
        views.print_json(known)
    else:
        views.print_pipelines(console, known)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise UsageMistake(f"cannot read {path}: {exc.strerror}")


@cli.command("ls")
def list_jobs(
    status: Annotated[Optional[str], typer.Option(help="Only jobs in this status.")] = None,
    tag: Annotated[Optional[str], typer.Option(help="Only jobs with this tag.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
    json_out: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    from itertools import islice

    which = _choice(status, JobStatus, "status")
    with _api() as api:
        jobs = list(islice(api.iter_jobs(page_size=min(limit, 1000), status=which and which.value, tag=tag), limit))
    views.print_json(jobs) if json_out else views.print_jobs(console, jobs)


@cli.command()
def show(job_id: str, json_out: JsonOpt = False) -> None:
    """Show one job: status, reason, counts, times."""
    with _api() as api:
        job = api.get(job_id)
    views.print_json(job) if json_out else views.print_job(console, job)


@cli.command()
def cancel(
    job_ids: Annotated[Optional[list[str]], typer.Argument(help="Jobs to cancel.")] = None,
    reason: Annotated[str, typer.Option(help="user_requested, timeout, system_shutdown, resource_limit, dependency_failed")] = "user_requested",
    message: Annotated[Optional[str], typer.Option(help="Why, in words; stored with the job.")] = None,
    status: Annotated[Optional[str], typer.Option(help="With --all: cancel every job in this status.")] = None,
    parent: Annotated[Optional[str], typer.Option(help="With --all: cancel every unfinished child of this job.")] = None,
    tag: Annotated[Optional[str], typer.Option(help="With --all: cancel every unfinished job with this tag.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Cancel every job matching --status / --parent / --tag.")] = False,
    cascade: Annotated[bool, typer.Option("--cascade/--no-cascade", help="Also cancel unfinished child jobs.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Cancel jobs by id, or every unfinished job matching a filter with --all (--status, --parent, --tag)."""
    why = _choice(reason, CancellationReason, "reason")
    ids = list(job_ids or [])
    if all_ or status or parent or tag:
        if not all_ or not (status or parent or tag) or ids:
            raise UsageMistake("use either job ids, or --status STATUS / --parent ID / --tag TAG with --all")
        which = _choice(status, JobStatus, "status")
        with _api() as api:
            bulk = api.cancel_matching(status=which and which.value, parent_job_id=parent, tag=tag,
                                       reason=why.value, message=message)
        if json_out:
            views.print_json(bulk)
        else:
            console.print(f"{bulk.matched} matched: {bulk.cancelled} cancelled, {bulk.cancelling} cancelling")
        return
    if not ids:
        raise UsageMistake("no job to cancel: pass job ids, or --status STATUS / --tag TAG with --all")
    answers, failures = [], []
    with _api() as api:
        for job_id in ids:
            try:
                answers.append(api.cancel(job_id, reason=why.value, message=message, cascade=cascade))
            except AndonAPIError as exc:
                if exc.status is None:  # the API is not there: one line, not one per id
                    raise
                failures.append(str(exc))
    if json_out:
        views.print_json(answers)
    else:
        for answer in answers:
            console.print(views.literal(f"{answer.job_id}: {answer.status} ({answer.message})"))
    for failure in failures:
        print(f"andon: {failure}", file=sys.stderr)
    if failures:
        raise typer.Exit(1)


@cli.command()
def resume(
    job_id: str,
    force: Annotated[bool, typer.Option("--force", help="Resume even if it was cancelled by a user.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Start a new job that reuses JOB_ID's finished items and runs only the rest."""
    with _api() as api:
        answer = api.resume(job_id, force=force)
    views.print_json(answer) if json_out else print(answer.job_id)


@cli.command()
def results(job_id: str, json_out: JsonOpt = False) -> None:
    """Show a job's partial results: every finished item, in order, and the failed ones."""
    with _api() as api:
        partial = api.results(job_id)
    views.print_json(partial) if json_out else views.print_partial_results(console, partial)


@cli.command()
def watch(
    job_id: str,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON line per event instead of a bar.")] = False,
) -> None:
    """Follow a job live until it ends (Ctrl-C stops watching, never the job)."""
    from api.watch import watch_job

    try:
        watch_job(job_id, console, json_lines=json_out)
    except KeyboardInterrupt:
        print(f"andon: stopped watching; job {job_id} goes on", file=sys.stderr)
        raise typer.Exit(130)


@cli.command()
def reap(json_out: JsonOpt = False) -> None:
    """Finalize running jobs whose worker is gone (heartbeat expired); workers also do this on a timer."""
    from tasks.reaper import reap_lost_jobs

    _writes_rows_here()
    reaped = reap_lost_jobs(actor="cli")
    if json_out:
        views.print_json(reaped)
    else:
        console.print(f"reaped {len(reaped)} lost job(s)" + "".join(f"\n  {j}" for j in reaped))


def _writes_rows_here() -> None:
    """For the verbs that write job rows in this process (``demo``, ``reap``, ``prune``): what they
    insert wakes the API's open event streams at once (:func:`tasks.notify.install`). The job verbs
    go through the API, which does that, and import none of the database layer."""
    from tasks import notify

    notify.install()


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or plain seconds; UsageMistake otherwise."""
    value, unit = text.strip().lower(), "s"
    if value[-1:] in _UNITS:
        value, unit = value[:-1], value[-1]
    try:
        seconds = float(value) * _UNITS[unit]
    except ValueError:
        seconds = float("nan")
    if not (0 <= seconds <= MAX_PRUNE_AGE_S):
        raise UsageMistake(f"--older-than {text!r}: expected a duration like 30d, 12h, 90m or 45s")
    return seconds


@cli.command()
def prune(
    older_than: Annotated[str, typer.Option("--older-than", help="Delete jobs that ended longer ago than this "
                                                                 "(30d, 12h, 90m, 45s).")],
    json_out: JsonOpt = False,
) -> None:
    """Delete finished jobs (with their items, events and tags) that ended longer ago than --older-than,
    1,000 per transaction; unfinished jobs are never deleted."""
    seconds = parse_duration(older_than)
    if _tenant() is not None:
        raise AndonError("prune acts on every tenant's jobs: it needs the admin token (ANDON_ADMIN_TOKEN)")
    from api import service

    _writes_rows_here()
    deleted = service.prune_jobs(seconds)
    if json_out:
        views.print_json({"deleted": deleted})
    else:
        console.print(f"deleted {deleted} job(s) that ended more than {older_than} ago")


def _exec(argv: list[str], env: dict[str, str] | None = None) -> None:
    sys.stdout.flush()
    os.execvpe(argv[0], argv, {**os.environ, **(env or {})})


@cli.command()
def worker(concurrency: Annotated[int, typer.Option(min=1)] = 2, loglevel: str = "INFO") -> None:
    """Run a prefork Celery worker (with task events for Flower)."""
    from api import supervisor
    from tasks import registry

    registry.load_configured()  # a bad ANDON_PIPELINES is one line here, before Celery starts
    _exec(supervisor.worker_argv("celery@%h", concurrency, extra=["-l", loglevel]))


@cli.command()
def api(host: str = "127.0.0.1", port: int = DEFAULT_API_PORT) -> None:
    """Run the HTTP API (uvicorn). Bound to a name, it answers that name too (Host allowlist)."""
    import ipaddress

    from api import supervisor
    from tasks import registry

    registry.load_configured()
    env = {}
    try:
        ipaddress.ip_address(host)  # an address: requests made to it are always accepted
    except ValueError:
        if not os.environ.get("ANDON_ALLOWED_HOSTS"):
            env["ANDON_ALLOWED_HOSTS"] = ",".join([*DEFAULT_ALLOWED_HOSTS, host])
    _exec(supervisor.api_argv(port, host=host), env)


@cli.command()
def flower(port: int = DEFAULT_FLOWER_PORT, address: str = "127.0.0.1") -> None:
    """Run Flower, always behind basic auth (ANDON_FLOWER_BASIC_AUTH, or the stack's)."""
    from api import supervisor

    settings = get_settings()
    auth = settings.flower_basic_auth or settings._stack().get("flower_basic_auth")
    if not auth or ":" not in auth:
        raise UsageMistake("set ANDON_FLOWER_BASIC_AUTH=user:password (Flower is never run without auth)")
    _exec(supervisor.flower_argv(port, address), env=supervisor.flower_env(auth))  # the password never in `ps`


def _unreachable(exc: Exception) -> str | None:
    """The line for Redis or the database out of reach of a local verb, else None. Looked up among
    the modules already imported: an error of a library this process never loaded can't be raised."""
    redis_errors, database_errors = sys.modules.get("redis.exceptions"), sys.modules.get("sqlalchemy.exc")
    if redis_errors is not None and isinstance(exc, redis_errors.ConnectionError):
        return f"cannot reach Redis ({exc}); is `andon up` running?"
    if database_errors is not None and isinstance(exc, database_errors.OperationalError):
        return f"database error: {str(exc.orig).splitlines()[0]}"
    return None


def main() -> None:
    """Entry point: turn every user-facing error into one line on stderr and a non-zero exit."""
    # the one line below is all a user sees of an error; library warnings (a notification that
    # could not be sent, say) are not theirs to read on a terminal
    logging.getLogger().addHandler(logging.NullHandler())
    try:
        code = cli(standalone_mode=False)
    except typer.Abort:
        print("andon: aborted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:  # Typer's own usage errors (bad option, unknown command)
        print(f"andon: {exc.format_message()}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    except AndonError as exc:
        print(f"andon: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
    except AndonAPIError as exc:  # what the API refused, or an API that isn't there: one line
        print(f"andon: {exc}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:
        line = _unreachable(exc)
        if line is None:
            raise
        print(f"andon: {line}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
