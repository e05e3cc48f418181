"""Page cursors: what the ``Link: <...>; rel="next"`` URL of a list carries back.

A cursor is the sort key of the last row a page showed (keyset pagination, not an offset): the next
page starts strictly after it, so a page deep in a list costs what the first one does (an index
range scan), and rows inserted meanwhile neither shift nor repeat the pages after them. It is opaque
to clients; one that doesn't decode to the key it should be is a 422, never a 500.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from tasks.errors import InvalidInput

__all__ = ["decode", "encode"]


def encode(*key: Any) -> str:
    """A cursor for the row whose sort key is ``key`` (JSON values)."""
    raw = json.dumps(list(key), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str, *parts: Callable[[Any], Any]) -> tuple[Any, ...]:
    """The key ``cursor`` was made from, each value passed through its part of ``parts`` (which
    raises ValueError or TypeError for a value it doesn't take); InvalidInput if anything is off."""
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(key, list) or len(key) != len(parts):
            raise ValueError("not a key of the right length")
        return tuple(part(value) for part, value in zip(parts, key))
    except (ValueError, TypeError) as exc:  # binascii.Error and JSONDecodeError are ValueErrors
        raise InvalidInput([{"loc": ["query", "cursor"], "msg": "not a cursor this API gave out",
                             "type": "value_error"}]) from exc
