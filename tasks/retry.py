"""Item retries for transient failures: a stage (or a whole pipeline) names the exceptions worth
another try — a model endpoint's 429 or 5xx, a flaky network — and how many tries.

The wait between tries grows exponentially with jitter, up to ``max_backoff_s``, and is a
cancellable wait (``ctx.wait`` / ``await ctx.sleep``): a cancel during a backoff stops the item at
once. Every retry is counted on the item. What it can't do: make a non-idempotent stage safe to run
twice — a stage that wrote half its output before failing writes it again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tasks.errors import PipelineError

__all__ = ["Retry"]


@dataclass(frozen=True)
class Retry:
    """Try a stage up to ``attempts`` times when it raises one of ``on``."""

    on: tuple[type[BaseException], ...]
    attempts: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        on = self.on if isinstance(self.on, tuple) else (self.on,)
        if not on or not all(isinstance(e, type) and issubclass(e, Exception) for e in on):
            raise PipelineError(f"Retry(on=...) takes Exception classes, got {self.on!r}")
        object.__setattr__(self, "on", on)
        if not 1 <= self.attempts <= 100:
            raise PipelineError("Retry(attempts=...) must be from 1 to 100")
        if not (0 <= self.backoff_s <= self.max_backoff_s <= 3600):
            raise PipelineError("Retry: 0 ≤ backoff_s ≤ max_backoff_s ≤ 3600")

    def should_retry(self, exc: BaseException, tried: int) -> bool:
        return tried < self.attempts and isinstance(exc, self.on)

    def delay_s(self, tried: int) -> float:
        """Before try ``tried + 1``: exponential, capped, with full jitter on the upper half."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** (tried - 1))
        return ceiling * random.uniform(0.5, 1.0)
