"""The README's example pipeline (examples/rag_ingest.py), run as a user would: a worker that loads it
through ANDON_PIPELINES, embeddings from a local OpenAI-compatible server the test starts, vectors
stored in a SQLite table, and a cancel with items in flight."""

from __future__ import annotations

import importlib
import os
import re
import sqlite3
import sys
from pathlib import Path

from api import service
from tests.jobs_helpers import items, wait_items, wait_terminal
from tests.llm_server import LLMServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def test_the_readme_shows_the_example_as_it_is():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- example: examples/rag_ingest.py -->\n```python\n(.*?)```", readme, re.S)
    assert block is not None and block.group(1) == (EXAMPLES / "rag_ingest.py").read_text()


def test_the_example_ingests_documents_and_stops_mid_way_when_cancelled(start_worker, tmp_path):
    db = tmp_path / "rag.db"
    with LLMServer(words=["unused"], embed_delay_s=0.3, dim=8) as server:
        env = {"ANDON_PIPELINES": "rag_ingest", "PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ["PYTHONPATH"]]),
               "RAG_EMBEDDINGS_URL": server.base_url, "RAG_DB": str(db)}
        worker = start_worker(concurrency=1, **env)
        sys.path.insert(0, str(EXAMPLES))  # the API side (this process) validates against it too
        try:
            importlib.import_module("rag_ingest")
        finally:
            sys.path.remove(str(EXAMPLES))
        documents = [" ".join(f"word{i}-{j}" for j in range(120)) for i in range(40)]
        job_id = service.submit_job(documents, pipeline="rag-ingest", queue=worker.queue).job_id
        wait_items(job_id, 8, timeout=60)
        service.cancel_job(job_id, message="enough")
        job = wait_terminal(job_id)
    assert job.status == "cancelled" and 8 <= job.completed_items < 40
    rows = items(job_id)
    done = [r for r in rows if r.status == "done"]
    interrupted = [r for r in rows if r.status == "interrupted"]
    # cut in flight: in the embed `await` (most), or in a `chunk` or `store` thread that was running
    assert interrupted and all(r.stage in ("chunk", "embed", "store") for r in interrupted)
    assert any(r.stage == "embed" for r in interrupted)
    assert all(r.result == {"chunks": 3} for r in done)
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT COUNT(*), COUNT(DISTINCT item) FROM chunks WHERE job = ?", (job_id,)).fetchone()
    # every finished item's vectors; an item whose `store` thread was mid-write when the cancel came
    # finishes that write (a thread can't be stopped mid-call) but is recorded interrupted, and resume
    # runs it again: a stage that writes elsewhere should write idempotently
    assert 3 * len(done) <= stored[0] <= 3 * (len(done) + len(interrupted)) and stored[1] >= len(done)
