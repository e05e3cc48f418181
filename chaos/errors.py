"""The harness's own exceptions."""

from __future__ import annotations


class Transient(Exception):
    """A call that may succeed if retried (a 5xx, a refused connection, Redis or the database away)."""
