"""The text work behind the built-in `documents` pipeline (tasks/documents.py), offline and deterministic.

Real work on real text, small enough to run anywhere: text normalisation and sentence split, a
hashing-trick embedding, and an extractive summary with keywords. The ``llm`` analyzer swaps the
last stage for an OpenAI-compatible endpoint.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections import Counter
from typing import Any

EMBEDDING_DIM = 64
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9][a-z0-9'-]*")
_STOPWORDS = frozenset(
    "a an and are as at be but by for from has have he her his i in is it its of on or our she so"
    " that the their them they this to was we were what when which who will with you your not"
    " been can do does had if into more most no than then there these those very would about document".split()
)


class EmptyDocument(ValueError):
    """A document with no text: it fails at ``parse`` and the job goes on."""


def parse(document: str) -> dict[str, Any]:
    if not isinstance(document, str):
        raise EmptyDocument(f"document must be text, got {type(document).__name__}")
    text = " ".join(unicodedata.normalize("NFKC", document).split())
    if not text:
        raise EmptyDocument("empty document")
    sentences = [s for s in _SENTENCE_END.split(text) if s]
    return {"text": text, "sentences": sentences}


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _hash_vector(words: list[str]) -> list[float]:
    vector = [0.0] * EMBEDDING_DIM
    for word in words:
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        bucket = int.from_bytes(digest[:4], "little") % EMBEDDING_DIM
        vector[bucket] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def embed(parsed: dict[str, Any]) -> dict[str, Any]:
    sentence_vectors = [_hash_vector(_tokens(s)) for s in parsed["sentences"]]
    return {**parsed, "vector": _hash_vector(_tokens(parsed["text"])), "sentence_vectors": sentence_vectors}


def analyze_local(embedded: dict[str, Any], summary_sentences: int = 2) -> dict[str, Any]:
    """Extractive summary (sentences closest to the document vector, in reading order) + keywords."""
    centre = embedded["vector"]
    scored = sorted(
        range(len(embedded["sentences"])),
        key=lambda i: -sum(a * b for a, b in zip(centre, embedded["sentence_vectors"][i])),
    )
    chosen = sorted(scored[:summary_sentences])
    words = [w for w in _tokens(embedded["text"]) if w not in _STOPWORDS and len(w) > 2]
    keywords = [w for w, _ in sorted(Counter(words).items(), key=lambda kv: (-kv[1], kv[0]))[:5]]
    return {
        "summary": " ".join(embedded["sentences"][i] for i in chosen),
        "keywords": keywords,
        "sentences": len(embedded["sentences"]),
        "words": len(_tokens(embedded["text"])),
        "embedding_head": [round(v, 4) for v in centre[:4]],
    }
