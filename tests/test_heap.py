"""The API freezes its start-up heap out of full garbage collections (api/heap.py): a request that
triggers one then waits only for what requests left behind, not for every module's objects."""

from __future__ import annotations

import gc


def test_the_apis_start_up_heap_is_frozen_once(api_client):
    from api.heap import freeze_startup_heap

    frozen = gc.get_freeze_count()
    assert frozen > 50_000  # FastAPI, SQLAlchemy, Celery, pydantic: well over 100,000 objects
    assert api_client.get("/api/jobs").status_code == 200
    freeze_startup_heap()  # a second start in the same process freezes nothing more (frozen objects can die)
    assert gc.get_freeze_count() <= frozen
