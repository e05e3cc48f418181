"""The API process's heap at start-up, frozen out of the cyclic garbage collector's full collections.

A full (generation 2) collection walks every tracked object in the process: FastAPI, pydantic,
SQLAlchemy and Celery leave well over 100,000 of them after import, none of them ever garbage. The
collector runs one whenever enough objects have survived the younger generations — every few
hundred requests — and the request that triggers it waits 100–130 ms of CPU (240–370 ms on a busy
box) for it: the outliers of the list p99s in bench/scale.py. ``gc.freeze()`` moves what exists now
into a permanent generation the collector never walks, so a full collection costs only what
requests left behind. What is garbage is collected first; what start-up made and later drops in a
cycle is never freed (it is once per process, at start-up, so the cost is bounded).
"""

from __future__ import annotations

import gc
import os

__all__ = ["freeze_startup_heap"]

_frozen_in: int | None = None


def freeze_startup_heap() -> None:
    """Collect, then freeze what is left out of later collections; once per process (a test suite
    starts the app many times in one process, a forked child starts again)."""
    global _frozen_in
    if _frozen_in == os.getpid():
        return
    _frozen_in = os.getpid()
    gc.collect()
    gc.freeze()
