"""The public pipeline API: a pipeline is a name, stages in order, and how many items run at once.

```python
from tasks import JobContext, Pipeline, stage

def clean(text: str) -> str:
    return " ".join(text.split())

async def summarize(text: str, ctx: JobContext) -> dict:
    return {"summary": await call_my_model(text)}      # a cancel interrupts this await at once

Pipeline("summarize", stages=[clean, stage(summarize, name="llm")], concurrency=4)
```

Whoever wrote the stages, andon runs a checkpoint before each one, commits each item the moment it
is done, and keeps every promise about stopping (see :mod:`tasks.runner`). A pipeline registers
itself by name when it is made; the worker and the API import the modules named in
``ANDON_PIPELINES`` at start (:mod:`tasks.registry`).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from db.settings import get_settings
from tasks import registry
from tasks.cancellation import CancellationToken
from tasks.context import JobContext
from tasks.engine import LocalRun, run_local
from tasks.errors import InvalidInput, PipelineError
from tasks.policy import check_policy
from tasks.retry import Retry

__all__ = ["JobContext", "LocalRun", "Pipeline", "Stage", "stage"]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
MAX_CONCURRENCY = 256


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline: ``fn(value)`` or ``fn(value, ctx)``, sync or async."""

    fn: Callable[..., Any]
    name: str
    takes_context: bool
    is_async: bool
    #: Tries again on the exceptions it names (:class:`~tasks.retry.Retry`); None: one try.
    retry: Retry | None = None

    def call(self, value: Any, ctx: JobContext) -> Any:
        return self.fn(value, ctx) if self.takes_context else self.fn(value)


def stage(fn: Callable[..., Any] | Stage, *, name: str | None = None, retry: Retry | None = None) -> Stage:
    """Make ``fn`` a stage, named ``name`` (default: the function's name, ≤ 64 characters), tried
    again per ``retry`` on the exceptions it names."""
    if retry is not None and not isinstance(retry, Retry):
        raise PipelineError(f"stage retry must be a tasks.Retry, got {retry!r}")
    if isinstance(fn, Stage):
        return Stage(fn.fn, _stage_name(name) if name else fn.name, fn.takes_context, fn.is_async,
                     retry or fn.retry)
    if not callable(fn):
        raise PipelineError(f"stage {fn!r} is not callable")
    return Stage(fn, _stage_name(name or getattr(fn, "__name__", type(fn).__name__)), _takes_context(fn),
                 _is_async(fn), retry)


def _stage_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PipelineError(f"invalid stage name {name!r}: 1-64 letters, digits, '_', '.', ':' or '-'")
    return name


def _is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _takes_context(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` accepts two positional arguments (the value and the context)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"stage {fn!r}: can't read its signature ({exc})") from None
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return True
    required = [p for p in positional if p.default is p.empty]
    if not positional or len(required) > 2:
        raise PipelineError(f"stage {getattr(fn, '__name__', fn)!r} must take (value) or (value, ctx)")
    # two required positional parameters, or a second one named for the context (``ctx=None``)
    return len(required) == 2 or (len(positional) >= 2 and positional[1].name in ("ctx", "context"))


@dataclass(eq=False)
class Pipeline:
    """A named list of stages every item goes through, in order; registered by name when made.

    ``concurrency``: up to this many items of one job in flight, on the worker process's event loop
    (sync stages then run in threads). ``item_model`` / ``options_model``: pydantic models (or any
    type pydantic validates) checking each item / the pipeline's own options at submit. ``queue``:
    the Celery queue its jobs go to (workers serving it must import the pipeline's module).
    ``policy``: what happens after a stop, by reason (:mod:`tasks.policy`); ``max_resumes``: how
    often a policy may resume one job's chain. ``retry``: the :class:`~tasks.retry.Retry` of every
    stage that doesn't declare its own.
    """

    name: str
    stages: list[Stage]
    concurrency: int = 1
    description: str | None = None
    item_model: Any = None
    options_model: type[BaseModel] | None = None
    queue: str | None = None
    _item_adapter: TypeAdapter | None = field(default=None, repr=False)

    def __init__(self, name: str, stages: Iterable[Callable[..., Any] | Stage], *, concurrency: int = 1,
                 description: str | None = None, item_model: Any = None,
                 options_model: type[BaseModel] | None = None, queue: str | None = None,
                 policy: Mapping[str, str] | None = None, max_resumes: int | None = None,
                 retry: Retry | None = None, register: bool = True) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise PipelineError(f"invalid pipeline name {name!r}: 1-64 letters, digits, '_', '.', ':' or '-'")
        self.name = name
        if retry is not None and not isinstance(retry, Retry):
            raise PipelineError(f"pipeline {name!r}: retry must be a tasks.Retry, got {retry!r}")
        self.stages = [stage(fn, retry=None if isinstance(fn, Stage) and fn.retry else retry) for fn in stages]
        if not self.stages:
            raise PipelineError(f"pipeline {name!r} has no stages")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise PipelineError(f"pipeline {name!r}: stage names must be unique, got {names}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= MAX_CONCURRENCY:
            raise PipelineError(f"pipeline {name!r}: concurrency must be an integer from 1 to {MAX_CONCURRENCY}")
        if options_model is not None and not (isinstance(options_model, type) and issubclass(options_model, BaseModel)):
            raise PipelineError(f"pipeline {name!r}: options_model must be a pydantic model class")
        if queue is not None and (not isinstance(queue, str) or not _NAME.fullmatch(queue)):
            raise PipelineError(f"pipeline {name!r}: invalid queue name {queue!r}")
        if max_resumes is not None and (isinstance(max_resumes, bool) or not isinstance(max_resumes, int)
                                        or max_resumes < 0):
            raise PipelineError(f"pipeline {name!r}: max_resumes must be a whole number ≥ 0")
        self.policy = check_policy(policy, f"pipeline {name!r} policy")
        self.max_resumes = max_resumes if max_resumes is not None else get_settings().max_policy_resumes
        self.concurrency = concurrency
        self.description = description
        self.item_model = item_model
        self.options_model = options_model
        self.queue = queue
        try:
            self._item_adapter = TypeAdapter(item_model) if item_model is not None else None
        except Exception as exc:
            raise PipelineError(f"pipeline {name!r}: item_model {item_model!r} is not a type pydantic knows") from exc
        if register:
            registry.register(self)

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def uses_loop(self) -> bool:
        """Runs on the event loop: it has an async stage, or more than one item in flight."""
        return self.concurrency > 1 or any(s.is_async for s in self.stages)

    # --- validation at the doors -------------------------------------------------------------

    def check_items(self, items: list[Any], field_name: str = "items") -> list[Any]:
        """The items as JSON, each validated by ``item_model``; InvalidInput names index and field."""
        if self._item_adapter is None:
            return items
        errors: list[dict[str, Any]] = []
        checked = []
        for index, item in enumerate(items):
            try:
                checked.append(self._item_adapter.dump_python(self._item_adapter.validate_python(item), mode="json"))
            except ValidationError as exc:
                errors += [{"loc": ["body", field_name, index, *e["loc"]], "msg": e["msg"], "type": e["type"]}
                           for e in exc.errors(include_url=False, include_input=False)]
            if len(errors) >= 20:
                break
        if errors:
            raise InvalidInput(errors)
        return checked

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The pipeline's own options, validated by ``options_model`` (none allowed without one)."""
        if self.options_model is None:
            if options:
                raise InvalidInput([{"loc": ["body", "options", key], "msg": f"pipeline {self.name!r} takes no "
                                     "option of this name", "type": "extra_forbidden"} for key in options])
            return {}
        try:
            return self.options_model.model_validate(options).model_dump(mode="json", exclude_unset=True)
        except ValidationError as exc:
            raise InvalidInput([{"loc": ["body", "options", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                                for e in exc.errors(include_url=False, include_input=False)]) from None

    def item_value(self, raw: Any) -> Any:
        """What the first stage receives: the stored JSON, as ``item_model`` if there is one."""
        return raw if self._item_adapter is None else self._item_adapter.validate_python(raw)

    def options_value(self, options: dict[str, Any]) -> Any:
        """What ``ctx.options`` holds: the ``options_model`` instance, or ``{}``."""
        return self.options_model.model_validate(options) if self.options_model is not None else {}

    def run_local(self, items: list[Any], *, options: dict[str, Any] | None = None,
                  token: CancellationToken | None = None) -> LocalRun:
        """Run every item in this process with a real token: for users' own unit tests.

        Returns a :class:`~tasks.engine.LocalRun` (results, failed and interrupted items, and the
        cancellation if ``token`` was cancelled meanwhile). Nothing touches Redis or a database.
        """
        return run_local(self, items, options=options, token=token)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "stages": self.stage_names, "concurrency": self.concurrency,
                "description": self.description, "queue": self.queue}
