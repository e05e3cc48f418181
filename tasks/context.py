"""What a stage is told about the item it works on, and how it cooperates with a cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
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
    The scratch dir is made when a stage first asks for it: most jobs never touch one.
    """

    job_id: str
    item_index: int
    options: Any
    token: CancellationToken
    cleanup: CleanupManager
    scratch: Path | Callable[[], Path] = field(repr=False)
    stage: str | None = None
    partial: Any = None

    @property
    def scratch_dir(self) -> Path:
        """The job's scratch dir (this run's own), removed on every exit path of the job."""
        return self.scratch if isinstance(self.scratch, Path) else self.scratch()

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
