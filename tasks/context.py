"""What a stage is told about the item it works on, and how it cooperates with a cancel."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.cancellation import CancellationToken
from tasks.cleanup import CleanupManager

__all__ = ["JobContext"]


@dataclass
class JobContext:
    """What a stage may know about the item it works on, and how it cooperates with a cancel.

    ``checkpoint()`` raises if the job was cancelled; ``wait(s)`` sleeps until ``s`` pass or a cancel
    comes (then raises), for sync stages; ``await sleep(s)`` is the same for async stages (a cancel
    cancels the task). ``partial`` is what the item had produced when it was interrupted (a helper
    such as an LLM stream fills it in); ``scratch_dir`` and ``cleanup`` are released on every exit path.
    """

    job_id: str
    item_index: int
    options: Any
    token: CancellationToken
    cleanup: CleanupManager
    scratch_dir: Path
    stage: str | None = None
    partial: Any = None

    def checkpoint(self) -> None:
        self.token.check()

    def wait(self, seconds: float) -> None:
        self.token.check()
        if self.token.wait(seconds):
            self.token.check()

    async def sleep(self, seconds: float) -> None:
        self.token.check()
        await asyncio.sleep(seconds)
        self.token.check()
