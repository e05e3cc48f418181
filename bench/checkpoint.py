"""1. Checkpoint cost: ``CancellationToken.check()`` against AbortableTask's ``is_aborted()`` and a Redis EXISTS."""

from __future__ import annotations

import time
import timeit
import uuid

from bench.report import Report, Row, fmt_s
from bench.sizes import GOAL_CHECK_NS, GOAL_CHECK_RATIO, Sizes


def bench_checkpoint(sizes: Sizes, report: Report) -> None:
    from celery.contrib.abortable import AbortableAsyncResult

    from tasks.app import app
    from tasks.cancellation.keys import cancel_key
    from tasks.errors import CancellationError
    from tasks.process import get_redis, get_store, get_watcher

    job_id = str(uuid.uuid4())
    watcher = get_watcher()
    token = watcher.watch(job_id)  # the live token a running job checks, its watcher thread subscribed
    watcher.connected.wait(5)
    app.backend.store_result(job_id, None, "STARTED")  # a running AbortableTask's state
    redis = get_redis()
    key = cancel_key(job_id)

    def abortable() -> bool:  # exactly what AbortableTask.is_aborted() does on every call
        return AbortableAsyncResult(job_id, app=app).is_aborted()

    def exists() -> int:
        return redis.exists(key)

    assert abortable() is False and exists() == 0 and token.check() is None

    def best(fn, number: int) -> float:
        fn()
        return min(timeit.Timer(fn).repeat(repeat=sizes.repeat, number=number)) / number

    andon = best(token.check, sizes.check_number)
    abort = best(abortable, sizes.net_number)
    exist = best(exists, sizes.net_number)

    # the token timed above still works: a cancel is seen by the very next check()
    get_store().cancel(job_id, message="bench")
    deadline = time.monotonic() + 5
    while not token.is_cancelled and time.monotonic() < deadline:
        time.sleep(0.001)
    try:
        token.check()
        raise RuntimeError("check() did not raise on a cancelled token")
    except CancellationError:
        pass
    watcher.unwatch(job_id)
    watcher.stop()  # this process must not spend CPU on the later phases' cancel messages
    if watcher._thread is not None:
        watcher._thread.join(timeout=3)

    ratio_abort, ratio_exists = abort / andon, exist / andon
    report.rows += [
        Row("checkpoint cost, per check", f"check(): {fmt_s(andon)}",
            f"AbortableTask is_aborted(): {fmt_s(abort)}", f"{ratio_abort:,.0f}× faster",
            f"≥ {GOAL_CHECK_RATIO:.0f}× faster and ≤ 1 µs",
            ratio_abort >= GOAL_CHECK_RATIO and andon * 1e9 <= GOAL_CHECK_NS,
            value=round(andon * 1e9, 1), unit="ns", n=sizes.check_number),
        Row("checkpoint cost vs a Redis EXISTS", f"check(): {fmt_s(andon)}", f"EXISTS: {fmt_s(exist)}",
            f"{ratio_exists:,.0f}× faster", "—", None, value=round(andon * 1e9, 1), unit="ns", n=sizes.check_number),
    ]
    report.extra["checkpoint"] = {"andon_ns": andon * 1e9, "abortable_ns": abort * 1e9, "exists_ns": exist * 1e9}
