"""Embeddings from an OpenAI-compatible ``/v1/embeddings`` endpoint (Ollama, vLLM, OpenAI).

One batched request per call, cancellable like the ``llm`` analyzer: a cancel of the token hangs
up the connection from the cancelling thread (:func:`tasks.llm.cancellable_client`), so a slow
batch stops at once. Honest limit: the server may finish computing the batch it already received.
"""

from __future__ import annotations

from typing import Any

from db.settings import get_settings
from tasks.cancellation import CancellationToken
from tasks.errors import EmbeddingError
from tasks.llm import cancellable_client, endpoint_error


def embed_texts(
    texts: list[str],
    *,
    base_url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    timeout_s: float | None = None,
    token: CancellationToken | None = None,
) -> list[list[float]]:
    """One vector per text, in the order of ``texts``, from one request.

    Unset arguments come from the ``ANDON_EMBEDDINGS_*`` settings. Raises the token's
    :class:`~tasks.errors.CancellationError` if it is cancelled before or during the request (the
    connection is hung up at once), :class:`EmbeddingError` if the endpoint fails (HTTP status,
    timeout, connection) or answers malformed or the wrong number of vectors. No retries;
    ``timeout_s`` bounds each wait for data.
    """
    import openai

    settings = get_settings()
    base_url = base_url or settings.embeddings_base_url
    model = model or settings.embeddings_model
    api_key = api_key or settings.embeddings_api_key
    timeout_s = settings.embeddings_timeout_s if timeout_s is None else timeout_s
    if token is not None:
        token.check()
    if not texts:
        return []
    with cancellable_client(token, base_url=base_url, api_key=api_key, timeout_s=timeout_s) as client:
        try:
            # "float" explicitly: the openai client asks for base64 by default, which not every server speaks
            response = client.embeddings.create(model=model, input=list(texts), encoding_format="float")
        except Exception as exc:
            if token is not None and token.is_cancelled:  # the hang-up surfaces as a connection error
                raise token.error() from exc
            if isinstance(exc, (openai.OpenAIError, ValueError)):  # ValueError: a body that is not JSON
                raise endpoint_error(exc, EmbeddingError, "embeddings", base_url, timeout_s) from exc
            raise
    return _vectors(response, len(texts), f"embeddings endpoint {base_url}")


def _vectors(response: Any, count: int, where: str) -> list[list[float]]:
    """The response's vectors ordered by ``index``, checked to be one list of numbers per input."""
    data = getattr(response, "data", None)
    if not isinstance(data, list):
        raise EmbeddingError(f"{where} answered something that is not an embeddings response (no data list)")
    try:
        ordered = sorted(data, key=lambda item: item.index)
        vectors = [[float(x) for x in item.embedding] for item in ordered]
    except (AttributeError, TypeError, ValueError) as exc:
        raise EmbeddingError(f"{where} answered a malformed embeddings response: {exc}") from exc
    if len(vectors) != count:
        raise EmbeddingError(f"{where} answered {len(vectors)} vectors for {count} inputs")
    if [item.index for item in ordered] != list(range(count)):
        raise EmbeddingError(f"{where} answered vector indices that are not 0..{count - 1}")
    if len({len(vector) for vector in vectors}) != 1:
        raise EmbeddingError(f"{where} answered vectors of different dimensions")
    return vectors
