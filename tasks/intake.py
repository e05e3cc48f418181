"""A submission checked at the door, whichever door: the API, the CLI, ``send_task``, a resume.

Job options are a closed, bounded schema: andon's own (limits and the escalation ladder — each at
most the operator's ceiling: an operator limit is a ceiling a job may only lower) and the pipeline's
(its ``options_model``). Items are checked by the pipeline's ``item_model``. Anything else is a 422
naming the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from db.settings import get_settings
from tasks import registry
from tasks.errors import InvalidInput
from tasks.pipeline import Pipeline

__all__ = [
    "ANDON_OPTIONS", "MAX_ITEMS", "MAX_SECONDS", "JobLimits", "Submission", "check_storable", "check_submission",
    "unstorable",
]

#: 30 days: longer than any job should be allowed to wait, and well inside what timers accept.
MAX_SECONDS = 30 * 24 * 3600.0
MAX_ITEMS = 100_000


class JobLimits(BaseModel):
    """andon's own job options, accepted for every pipeline."""

    model_config = ConfigDict(extra="forbid")

    #: Celery time limits for this job (soft → a `timeout` cancel at a checkpoint; hard → child killed).
    soft_time_limit_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    time_limit_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    #: RSS ceiling for this job's worker process, in MiB (at most ANDON_MAX_JOB_RSS_MB).
    max_rss_mb: float | None = Field(default=None, gt=0, le=1024 * 1024)
    #: The escalation ladder for this job (at most ANDON_ESCALATE_AFTER_S / ANDON_KILL_AFTER_S).
    escalate_after_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    kill_after_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)

    @model_validator(mode="after")
    def soft_before_hard(self) -> JobLimits:
        if self.soft_time_limit_s and self.time_limit_s and self.soft_time_limit_s >= self.time_limit_s:
            raise ValueError("soft_time_limit_s must be below time_limit_s")
        return self


ANDON_OPTIONS = tuple(JobLimits.model_fields)


def _ceilings() -> dict[str, float | None]:
    s = get_settings()
    return {"time_limit_s": s.job_time_limit_s, "soft_time_limit_s": s.job_soft_time_limit_s or s.job_time_limit_s,
            "max_rss_mb": s.max_job_rss_mb, "escalate_after_s": s.escalate_after_s, "kill_after_s": s.kill_after_s}


#: What neither database stores in text or JSON: PostgreSQL refuses NUL in ``text`` and ``\\u0000``
#: in ``jsonb``; a lone UTF-16 surrogate can't be encoded as UTF-8 for either (SQLite's driver raises).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _has_unstorable(text: str) -> bool:
    """Whether ``text`` holds a NUL or a lone surrogate. Text that is all ASCII (CPython knows that
    without a scan) can hold no surrogate, so a NUL is all to look for: one ``memchr``, not the
    regex's walk of every character through its class — 2 µs a 200-character item, most of a
    batch's checks."""
    return "\x00" in text if text.isascii() else _UNSTORABLE.search(text) is not None


def unstorable(text: str) -> str | None:
    """Why ``text`` can't be stored (None if it can)."""
    if not _has_unstorable(text):
        return None
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    char = found.group()
    return ("contains a NUL character (\\u0000), which the database can't store" if char == "\x00" else
            f"contains a lone surrogate (\\u{ord(char):04x}), which the database can't store")


def check_storable(value: Any, loc: Sequence[str | int]) -> None:
    """InvalidInput (422) naming the first value in ``value`` — a string, or any JSON of lists and
    objects, keys included — that the database can't store: text with NUL or a lone surrogate, or
    NaN / Infinity (PostgreSQL's jsonb refuses them). Iterative: a deeply nested body can't make it
    overflow the stack."""
    if _clean(value):
        return
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, tuple(loc))]
    while stack:
        current, where = stack.pop()
        if isinstance(current, str):
            why = unstorable(current)
            if why:
                raise InvalidInput([{"loc": list(where), "msg": f"Value error, {why}", "type": "value_error"}])
        elif isinstance(current, float) and not math.isfinite(current):
            raise InvalidInput([{"loc": list(where), "type": "finite_number",
                                 "msg": f"Value error, {current} is not a JSON number the database can store"}])
        elif isinstance(current, dict):
            for key, item in current.items():
                why = unstorable(key) if isinstance(key, str) else None
                if why:
                    raise InvalidInput([{"loc": [*where, key], "msg": f"Value error, the key {why}",
                                         "type": "value_error"}])
            stack.extend((item, (*where, key)) for key, item in reversed(list(current.items())))
        elif isinstance(current, (list, tuple)):
            stack.extend((item, (*where, i)) for i, item in reversed(list(enumerate(current))))


_SCALARS = (int, bool, type(None))


def _clean(value: Any) -> bool:
    """True when nothing in ``value`` is unstorable: :func:`check_storable`'s walk without the
    locations it names (a tuple per value it visits) — nearly every body is clean, and a batch
    checks ten thousand. False also for a type it doesn't know: the full walk then decides."""
    stack = [value]
    while stack:
        current = stack.pop()
        kind = type(current)
        if kind is str:
            if _has_unstorable(current):
                return False
        elif kind is list or kind is tuple:
            stack.extend(current)
        elif kind is dict:
            if any(type(key) is not str or _has_unstorable(key) for key in current):
                return False
            stack.extend(current.values())
        elif kind is float:
            if not math.isfinite(current):
                return False
        elif kind not in _SCALARS:
            return False
    return True


@dataclass(frozen=True)
class Submission:
    pipeline: Pipeline
    items: list[Any]
    options: dict[str, Any]


def check_submission(pipeline_name: str, items: Any, options: Any = None, *, items_field: str = "items") -> Submission:
    """The pipeline, its items and the job's options, each checked; raises UnknownPipeline or InvalidInput."""
    pipeline = registry.get(pipeline_name)
    if not isinstance(items, list) or not items:
        raise InvalidInput([{"loc": ["body", items_field], "msg": "must be a non-empty list", "type": "list_type"}])
    if len(items) > MAX_ITEMS:
        raise InvalidInput([{"loc": ["body", items_field], "msg": f"at most {MAX_ITEMS} items", "type": "too_long"}])
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise InvalidInput([{"loc": ["body", "options"], "msg": "must be an object", "type": "dict_type"}])
    check_storable(items, ["body", items_field])  # before any model sees them, and before any write
    check_storable(options, ["body", "options"])
    own = {key: value for key, value in options.items() if key in ANDON_OPTIONS}
    try:  # none of andon's options given (most jobs): no limits, and no model to say so
        limits = JobLimits.model_validate(own).model_dump(exclude_none=True) if own else {}
    except ValidationError as exc:
        raise InvalidInput([{"loc": ["body", "options", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                            for e in exc.errors(include_url=False, include_input=False)]) from None
    for key, ceiling in _ceilings().items():
        if ceiling is not None and limits.get(key) is not None and limits[key] > ceiling:
            raise InvalidInput([{"loc": ["body", "options", key], "type": "less_than_equal",
                                 "msg": f"at most the operator's limit of {ceiling:g}"}])
    own_options = pipeline.check_options({k: v for k, v in options.items() if k not in ANDON_OPTIONS})
    return Submission(pipeline, pipeline.check_items(items, items_field), {**limits, **own_options})
