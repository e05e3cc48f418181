"""The benchmark's own user pipeline (loaded by its workers through ANDON_PIPELINES): four async
items in flight, each awaiting, so a cancel has four ``await``s to interrupt."""

from __future__ import annotations

from tasks import JobContext, Pipeline


async def wait_a_while(item, ctx: JobContext) -> dict:
    await ctx.sleep(2.0)
    return {"item": item}


Pipeline("bench-async", [wait_a_while], concurrency=4, description="four awaits in flight per job")
