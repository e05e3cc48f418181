"""Idempotency keys: the rows behind ``Idempotency-Key`` (see :mod:`api.idempotency` for the flow).

A row is inserted before the request runs (the first inserter owns the key; the primary key makes
every other insert fail), and its answer is written when the request has one. A row with no answer
is a request in progress.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, or_, update
from sqlalchemy.exc import IntegrityError

from db.models import IdempotencyKey, utcnow
from db.session import session_scope


@dataclass(frozen=True)
class Recorded:
    """A key's row as another request left it."""

    request_hash: str
    status_code: int | None  # None: that request is still running
    response: Any
    created_at: datetime


def _this(tenant: str | None, key: str):
    return and_(IdempotencyKey.tenant == (tenant or ""), IdempotencyKey.key == key)


def claim(tenant: str | None, key: str, request_hash: str, *, expired_before: datetime,
          abandoned_before: datetime) -> Recorded | None:
    """Take ``key`` for a new request: None if this call owns it now, else the row that holds it.

    In the same transaction an answer older than ``expired_before`` is forgotten, and so is a claim
    made before ``abandoned_before`` that never got an answer (its process died mid-request)."""
    try:
        with session_scope() as session:
            session.execute(delete(IdempotencyKey).where(_this(tenant, key), or_(
                IdempotencyKey.created_at < expired_before,
                and_(IdempotencyKey.status_code.is_(None), IdempotencyKey.created_at < abandoned_before))))
            session.add(IdempotencyKey(tenant=tenant or "", key=key, request_hash=request_hash, created_at=utcnow()))
        return None
    except IntegrityError:
        pass
    return read(tenant, key)


def read(tenant: str | None, key: str) -> Recorded | None:
    with session_scope() as session:
        row = session.get(IdempotencyKey, (tenant or "", key))
        if row is None:
            return None
        return Recorded(row.request_hash, row.status_code, row.response, row.created_at)


def answer(tenant: str | None, key: str, request_hash: str, status_code: int, response: Any) -> None:
    """Record the answer of the request that owns ``key``."""
    with session_scope() as session:
        session.execute(update(IdempotencyKey).where(
            _this(tenant, key), IdempotencyKey.request_hash == request_hash, IdempotencyKey.status_code.is_(None))
            .values(status_code=status_code, response=response))


def release(tenant: str | None, key: str, request_hash: str) -> None:
    """The owning request failed before it had an answer: free the key for a retry."""
    with session_scope() as session:
        session.execute(delete(IdempotencyKey).where(
            _this(tenant, key), IdempotencyKey.request_hash == request_hash, IdempotencyKey.status_code.is_(None)))


def forget_expired(before: datetime) -> int:
    """Delete answers older than ``before`` (a prune); the rows are ignored after their TTL anyway."""
    with session_scope() as session:
        return session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < before)).rowcount
