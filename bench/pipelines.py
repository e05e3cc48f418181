"""The benchmark's own user pipelines (loaded by its workers through ANDON_PIPELINES): four async
items in flight, each awaiting, so a cancel has four ``await``s to interrupt; and the memory
figures' (bench/memory.py): a job held in its item's wait, 250 async items awaiting at once, and a
no-op item."""

from __future__ import annotations

from tasks import JobContext, Pipeline


async def wait_a_while(item, ctx: JobContext) -> dict:
    await ctx.sleep(2.0)
    return {"item": item}


Pipeline("bench-async", [wait_a_while], concurrency=4, description="four awaits in flight per job")


def hold(item, ctx: JobContext) -> dict:
    ctx.wait(600)  # until the bench cancels it
    return {"item": item}


async def hold_async(item, ctx: JobContext) -> dict:
    await ctx.sleep(600)
    return {"item": item}


def noop(item) -> dict:
    return {"item": item}


Pipeline("bench-hold", [hold], description="one item held in its wait until cancelled")
Pipeline("bench-inflight", [hold_async], concurrency=250, description="250 awaits in flight per job")
Pipeline("bench-noop", [noop], description="one stage that does nothing")
