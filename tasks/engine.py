"""Items through stages: the part of running a job that is the same in a worker and in a user's test.

Two ways to run, chosen by the pipeline, with one set of promises:

* **in this thread** — every stage sync and one item at a time: the cheapest path, exactly the
  shape of a plain loop with a checkpoint before each stage.
* **on the process's event loop** — an async stage, or ``concurrency`` > 1: up to N items in flight
  as tasks; sync stages run in threads. A cancel cancels every task at once (the ``await`` in
  flight ends within milliseconds); a sync stage in a thread stops at its next checkpoint or
  ``ctx.wait``, and the escalation ladder can :meth:`ItemRun.force` it.

Records of finished, failed and interrupted items are handed to ``on_record`` in the calling thread,
so a worker commits them from one thread, in order, and the loop never waits on a database.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import inspect
import json
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db.vocabulary import ItemStatus
from tasks.cancellation import CancellationError, CancellationToken, ForcedCancellation, cancellation_in
from tasks.cleanup import CleanupManager
from tasks.context import JobContext
from tasks.process import get_loop

if TYPE_CHECKING:
    from tasks.pipeline import Pipeline, Stage

__all__ = ["ItemRecord", "ItemRun", "LocalRun", "json_result", "run_local"]

#: A result larger than this (as JSON) fails its item: rows are for results, not blobs.
MAX_RESULT_BYTES = 4 * 2**20


@dataclass
class ItemRecord:
    """One item that will not run again in this job: done, failed, or interrupted by a cancel."""

    index: int
    status: ItemStatus
    stage: str
    result: Any = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: How many times a stage of this item was tried again (its stage's Retry).
    retries: int = 0

    @property
    def usage(self) -> dict[str, Any] | None:
        """The LLM usage the item reports (``result["usage"]``, or its partial's), if any."""
        usage = self.result.get("usage") if isinstance(self.result, dict) else None
        if not isinstance(usage, dict):
            return None
        tokens = {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in tokens.values()):
            return None
        return {**tokens, "cut_short": bool(usage.get("cut_short")), "estimated": bool(usage.get("estimated"))}


def json_result(value: Any) -> Any:
    """``value`` after a strict JSON round trip (no NaN or infinity, no NUL, bounded size)."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the result does not survive a JSON round trip: {exc}") from None
    if "\\u0000" in text:
        raise ValueError("the result contains a NUL character, which databases can't store")
    if len(text) > MAX_RESULT_BYTES:
        raise ValueError(f"the result is {len(text)} bytes of JSON, above the {MAX_RESULT_BYTES} limit")
    return json.loads(text)


class ItemRun:
    """Runs a list of ``(index, item)`` through a pipeline until done or cancelled.

    :meth:`run` returns when every item was tried, or raises the cancellation that stopped it after
    every in-flight item was recorded ``interrupted`` with the stage it reached.
    """

    def __init__(self, pipeline: Pipeline, token: CancellationToken, context: Callable[[int], JobContext],
                 on_record: Callable[[ItemRecord], None],
                 on_position: Callable[[int, str], None] = lambda index, stage: None) -> None:
        self.pipeline = pipeline
        self.token = token
        self.context = context
        self.on_record = on_record
        self.on_position = on_position
        #: When the first in-flight item saw the cancel (what ``cancel_observed_at`` records).
        self.observed_at: datetime | None = None
        self._caller = threading.get_ident()
        self._records: queue.SimpleQueue[ItemRecord | None] = queue.SimpleQueue()
        self._threads: set[int] = set()
        self._threads_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []

    # --- the two ways ----------------------------------------------------------------------------

    def run(self, items: Iterable[tuple[int, Any]]) -> None:
        items = list(items)
        if not items:
            return
        if self.pipeline.uses_loop:
            self._run_on_loop(items)
        else:
            for index, raw in items:
                self.token.check()
                self._item_here(index, raw)

    def _item_here(self, index: int, raw: Any) -> None:
        ctx = self.context(index)
        started_at, started, retries = datetime.now(UTC), False, [0]
        try:
            value = self.pipeline.item_value(raw)
            for stage in self.pipeline.stages:
                started = self._checkpoint(index, ctx, stage)
                value = self._tries_here(stage, value, ctx, retries)
        except BaseException as exc:
            self._stopped(exc, index, ctx, started, started_at, self.on_record, retries[0])
            return
        self.on_record(self._finished(index, ctx, value, started_at, retries[0]))

    def _tries_here(self, stage: Stage, value: Any, ctx: JobContext, retries: list[int]) -> Any:
        tried = 1
        while True:
            try:
                result = stage.call(value, ctx)
                if inspect.isawaitable(result):
                    _close(result)
                    raise TypeError(f"stage {stage.name!r} returned an awaitable: declare it `async def`")
                return result
            except Exception as exc:  # a cancel is a BaseException: never retried
                if stage.retry is None or not stage.retry.should_retry(exc, tried):
                    raise
                retries[0] += 1
                ctx.wait(stage.retry.delay_s(tried))  # a cancel ends the backoff at once
                tried += 1

    def _run_on_loop(self, items: list[tuple[int, Any]]) -> None:
        self._loop = get_loop()
        executor = None
        if any(not s.is_async for s in self.pipeline.stages):
            executor = concurrent.futures.ThreadPoolExecutor(self.pipeline.concurrency,
                                                             thread_name_prefix="andon-stage")
        future = asyncio.run_coroutine_threadsafe(self._drive(items, executor), self._loop)
        future.add_done_callback(lambda _: self._records.put(None))
        try:
            while (record := self._records.get()) is not None:
                self.on_record(record)
            future.result()
        except BaseException:
            # torn down while waiting (SystemExit from a signal): stop the items, keep their records
            self._cancel_tasks_threadsafe()
            try:
                future.result(timeout=2.0)
            except BaseException:
                pass
            while not self._records.empty():
                if (record := self._records.get()) is not None:
                    self.on_record(record)
            raise
        finally:
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        if self.observed_at is not None:
            raise self.token.error()

    async def _drive(self, items: list[tuple[int, Any]], executor) -> None:
        pending = iter(items)

        async def take_items() -> None:
            for index, raw in pending:
                self.token.check()
                await self._item_on_loop(index, raw, executor)

        self._tasks = [asyncio.ensure_future(take_items()) for _ in range(min(self.pipeline.concurrency, len(items)))]
        self.token.register_callback(lambda _token: self._cancel_tasks_threadsafe())
        outcomes = await asyncio.gather(*self._tasks, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                if cancellation_in(outcome) is not None:
                    self._observed()
                    continue
                raise outcome

    async def _item_on_loop(self, index: int, raw: Any, executor) -> None:
        ctx = self.context(index)
        started_at, started, retries = datetime.now(UTC), False, [0]
        put = self._records.put
        try:
            value = self.pipeline.item_value(raw)
            for stage in self.pipeline.stages:
                started = self._checkpoint(index, ctx, stage)
                value = await self._tries_on_loop(executor, stage, value, ctx, retries)
        except BaseException as exc:
            self._stopped(exc, index, ctx, started, started_at, put, retries[0])
            return
        put(self._finished(index, ctx, value, started_at, retries[0]))

    async def _tries_on_loop(self, executor, stage: Stage, value: Any, ctx: JobContext, retries: list[int]) -> Any:
        tried = 1
        while True:
            try:
                if stage.is_async:
                    result = await stage.call(value, ctx)
                else:
                    result = await self._in_thread(executor, stage, value, ctx)
                if inspect.isawaitable(result):
                    result = await result
                return result
            except Exception as exc:  # a cancel (CancellationError, CancelledError) is never retried
                if stage.retry is None or not stage.retry.should_retry(exc, tried):
                    raise
                retries[0] += 1
                await ctx.sleep(stage.retry.delay_s(tried))  # a cancel ends the backoff at once
                tried += 1

    async def _in_thread(self, executor, stage: Stage, value: Any, ctx: JobContext) -> Any:
        future = asyncio.get_running_loop().run_in_executor(executor, self._call_in_thread, stage, value, ctx)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # the thread runs on until its next checkpoint (the token is cancelled) or the ladder forces
            # it; the item ends only then, so nothing of it is left running after the job has ended
            await asyncio.wait([future])
            raise  # even if it finished meanwhile: nothing of a job is recorded done after its cancel was seen

    def _call_in_thread(self, stage: Stage, value: Any, ctx: JobContext) -> Any:
        ident = threading.get_ident()
        with self._threads_lock:
            self._threads.add(ident)
        try:
            return stage.call(value, ctx)
        finally:
            with self._threads_lock:
                self._threads.discard(ident)

    def _checkpoint(self, index: int, ctx: JobContext, stage: Stage) -> bool:
        """Before every stage of every item: raise if cancelled, else say where the job is. True
        once the item has started (a cancel seen before its first stage leaves no record of it)."""
        ctx.stage = stage.name
        self.token.check()
        self.on_position(index, stage.name)
        return True

    # --- how an item ends ------------------------------------------------------------------------

    def _finished(self, index: int, ctx: JobContext, value: Any, started_at: datetime, retries: int) -> ItemRecord:
        try:
            return ItemRecord(index, ItemStatus.DONE, ctx.stage, result=json_result(value), started_at=started_at,
                              retries=retries)
        except ValueError as exc:
            return ItemRecord(index, ItemStatus.FAILED, ctx.stage, error=str(exc), started_at=started_at,
                              retries=retries)

    def _stopped(self, exc: BaseException, index: int, ctx: JobContext, started: bool, started_at: datetime,
                 put: Callable[[ItemRecord], None], retries: int = 0) -> None:
        """Record an item that raised, then re-raise what must stop the job (a cancel, a teardown)."""
        cancel = cancellation_in(exc)
        if cancel is not None or isinstance(exc, asyncio.CancelledError):
            at = self._observed()
            if started:
                partial = ctx.partial if ctx.partial is not None else getattr(cancel, "partial", None)
                try:
                    partial = json_result(partial)
                except ValueError:
                    partial = None
                put(ItemRecord(index, ItemStatus.INTERRUPTED, ctx.stage, result=partial, started_at=started_at,
                               finished_at=at, retries=retries))
            if cancel is not None and cancel is not exc:
                raise cancel from None  # unwrapped from an exception group
            raise exc
        if not isinstance(exc, Exception):
            raise exc  # SystemExit, KeyboardInterrupt: the process is going away
        put(ItemRecord(index, ItemStatus.FAILED, ctx.stage or self.pipeline.stages[0].name,
                       error=f"{type(exc).__name__}: {exc}", started_at=started_at, retries=retries))

    def _observed(self) -> datetime:
        if self.observed_at is None:
            self.observed_at = datetime.now(UTC)
        return self.observed_at

    # --- stopping from outside -------------------------------------------------------------------

    def _cancel_tasks_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._cancel_tasks)

    def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()

    def force(self) -> None:
        """The ladder's first step for a job that ignores its cancel: raise :class:`ForcedCancellation`
        into every thread running one of its stages (can't interrupt a blocking C call), and cancel
        its tasks again."""
        if self._loop is None:
            targets = [self._caller]
        else:
            with self._threads_lock:
                targets = list(self._threads)
            self._cancel_tasks_threadsafe()
        for ident in targets:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(ForcedCancellation))


def _close(awaitable: Any) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()


@dataclass
class LocalRun:
    """What :meth:`Pipeline.run_local` returns: results by index, failed and interrupted items, and
    the cancellation that stopped the run (None if every item was tried)."""

    results: dict[int, Any]
    failed: dict[int, str]
    interrupted: dict[int, str]
    cancelled: CancellationError | None = None
    #: How many times each item's stages were tried again (items that never retried are left out).
    retries: dict[int, int] = field(default_factory=dict)


def run_local(pipeline: Pipeline, items: list[Any], *, options: dict[str, Any] | None = None,
              token: CancellationToken | None = None, job_id: str = "local") -> LocalRun:
    token = token or CancellationToken(job_id)
    option_values = pipeline.options_value(pipeline.check_options(options or {}))
    cleanup = CleanupManager()
    scratch_root = Path(tempfile.mkdtemp(prefix="andon-local-"))
    cleanup.register(lambda: shutil.rmtree(scratch_root, ignore_errors=True), f"remove {scratch_root}")
    outcome = LocalRun({}, {}, {})

    def record(r: ItemRecord) -> None:
        if r.retries:
            outcome.retries[r.index] = r.retries
        if r.status is ItemStatus.DONE:
            outcome.results[r.index] = r.result
        elif r.status is ItemStatus.FAILED:
            outcome.failed[r.index] = r.error or ""
        else:
            outcome.interrupted[r.index] = r.stage

    def context(index: int) -> JobContext:
        return JobContext(job_id, index, option_values, token, cleanup, scratch_root)

    try:
        ItemRun(pipeline, token, context, record).run(enumerate(pipeline.check_items(list(items))))
    except CancellationError as cancelled:
        outcome.cancelled = token.error() if token.is_cancelled else cancelled
    finally:
        cleanup.run()
    return outcome
