"""The built-in ``documents`` pipeline: parse → embed → analyze, written on the public API like any
user's pipeline.

Offline and deterministic by default (text normalisation, a hashing-trick embedding, an extractive
summary: :mod:`tasks.stages`). ``embedder: "openai"`` embeds through any OpenAI-compatible
``/v1/embeddings`` endpoint, ``analyzer: "llm"`` summarises by streaming from a chat endpoint; a
cancel hangs up either at once. ``stage_delay_s`` simulates work per stage, spent waiting on the
token so a cancel interrupts it (demos and tests).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from db.settings import get_settings
from tasks import stages
from tasks.context import JobContext
from tasks.embeddings import embed_texts
from tasks.llm import analyze_llm
from tasks.pipeline import Pipeline

__all__ = ["DOCUMENTS", "DocumentsOptions"]


class DocumentsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Simulated work per stage, spent waiting on the token (a cancel ends it at once).
    stage_delay_s: float = Field(default=0.0, ge=0, le=3600)
    #: ``local``: extractive summary, offline; ``llm``: an OpenAI-compatible streaming chat endpoint.
    analyzer: Literal["local", "llm"] = "local"
    #: ``local``: hashing-trick vectors, offline; ``openai``: an OpenAI-compatible embeddings endpoint.
    embedder: Literal["local", "openai"] = "local"


def _work(ctx: JobContext) -> None:
    delay = ctx.options.stage_delay_s
    if delay:
        ctx.wait(delay)


def parse(document: str, ctx: JobContext) -> dict[str, Any]:
    _work(ctx)
    return stages.parse(document)


def embed(parsed: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    _work(ctx)
    if ctx.options.embedder == "local":
        return stages.embed(parsed)
    settings = get_settings()
    vectors = embed_texts([parsed["text"], *parsed["sentences"]], base_url=settings.embeddings_base_url,
                          model=settings.embeddings_model, api_key=settings.embeddings_api_key,
                          timeout_s=settings.embeddings_timeout_s, token=ctx.token)
    return {**parsed, "vector": vectors[0], "sentence_vectors": vectors[1:]}


def analyze(embedded: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    _work(ctx)
    if ctx.options.analyzer == "local":
        return stages.analyze_local(embedded)
    settings = get_settings()
    return analyze_llm(embedded, ctx.token, base_url=settings.llm_base_url, model=settings.llm_model,
                       api_key=settings.llm_api_key, timeout_s=settings.llm_timeout_s)


DOCUMENTS = Pipeline(
    "documents", [parse, embed, analyze], item_model=str, options_model=DocumentsOptions,
    description="Summarise documents: parse → embed → analyze (offline by default).",
)
