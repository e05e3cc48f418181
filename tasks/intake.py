"""A submission checked at the door, whichever door: the API, the CLI, ``send_task``, a resume.

Job options are a closed, bounded schema: andon's own (limits and the escalation ladder — each at
most the operator's ceiling: an operator limit is a ceiling a job may only lower) and the pipeline's
(its ``options_model``). Items are checked by the pipeline's ``item_model``. Anything else is a 422
naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from db.settings import get_settings
from tasks import registry
from tasks.errors import InvalidInput
from tasks.pipeline import Pipeline

__all__ = ["ANDON_OPTIONS", "MAX_ITEMS", "MAX_SECONDS", "JobLimits", "Submission", "check_submission"]

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
    own = {key: value for key, value in options.items() if key in ANDON_OPTIONS}
    try:
        limits = JobLimits.model_validate(own).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise InvalidInput([{"loc": ["body", "options", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                            for e in exc.errors(include_url=False, include_input=False)]) from None
    for key, ceiling in _ceilings().items():
        if ceiling is not None and limits.get(key) is not None and limits[key] > ceiling:
            raise InvalidInput([{"loc": ["body", "options", key], "type": "less_than_equal",
                                 "msg": f"at most the operator's limit of {ceiling:g}"}])
    own_options = pipeline.check_options({k: v for k, v in options.items() if k not in ANDON_OPTIONS})
    return Submission(pipeline, pipeline.check_items(items, items_field), {**limits, **own_options})
