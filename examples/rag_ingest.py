"""RAG ingestion on andon: chunk → embed (async, 8 items in flight) → store vectors in a table.

Run it: ANDON_PIPELINES=rag_ingest PYTHONPATH=examples andon up, then
andon submit --pipeline rag-ingest "First document ..." "Second ..."
"""

import json
import os
import sqlite3

from openai import AsyncOpenAI

from tasks import JobContext, Pipeline, stage

# made once, at import: every job's async stages run on the worker's one long-lived event loop
client = AsyncOpenAI(base_url=os.environ.get("RAG_EMBEDDINGS_URL", "http://127.0.0.1:11434/v1"),
                     api_key=os.environ.get("RAG_API_KEY", "not-needed"), max_retries=0)
DB = os.environ.get("RAG_DB", "rag.db")


def chunk(text: str) -> list[str]:  # a sync stage: fn(value)
    words = text.split()
    return [" ".join(words[i:i + 50]) for i in range(0, len(words), 50)]


async def embed(chunks: list[str], ctx: JobContext) -> dict:  # async: fn(value, ctx)
    reply = await client.embeddings.create(model="nomic-embed-text", input=chunks)  # a cancel ends this await
    return {"chunks": chunks, "vectors": [d.embedding for d in reply.data]}


def store(embedded: dict, ctx: JobContext) -> dict:  # sync stages run in threads under concurrency
    ctx.checkpoint()  # nothing is written once the job is cancelled
    with sqlite3.connect(DB) as db:
        db.execute("CREATE TABLE IF NOT EXISTS chunks (job TEXT, item INT, text TEXT, vector TEXT)")
        db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?)",
                       [(ctx.job_id, ctx.item_index, text, json.dumps(vector))
                        for text, vector in zip(embedded["chunks"], embedded["vectors"])])
    return {"chunks": len(embedded["chunks"])}


Pipeline("rag-ingest", [chunk, stage(embed, name="embed"), store], concurrency=8, item_model=str,
         description="chunk → embed → store vectors in SQLite")
