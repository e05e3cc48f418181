"""Pipelines by name: the built-in ``documents`` and those of the modules in ``ANDON_PIPELINES``.

The worker and the API load them at start (:func:`load_configured`), so a name registered twice, a
stage that is not callable or a module that doesn't import is a clear error then, not at the first
job. Any other process loads them on first use.
"""

from __future__ import annotations

import importlib
import threading
from typing import TYPE_CHECKING

from db.settings import get_settings
from tasks.errors import PipelineError, UnknownPipeline

if TYPE_CHECKING:
    from tasks.pipeline import Pipeline

__all__ = ["get", "load_configured", "names", "pipelines", "register"]

BUILTIN_MODULES = ("tasks.documents",)

_pipelines: dict[str, Pipeline] = {}
_loaded = False
_lock = threading.RLock()


def register(pipeline: Pipeline) -> None:
    with _lock:
        known = _pipelines.get(pipeline.name)
        if known is not None and known is not pipeline:
            raise PipelineError(f"pipeline {pipeline.name!r} is registered twice")
        _pipelines[pipeline.name] = pipeline


def configured_modules() -> list[str]:
    spec = get_settings().pipelines or ""
    return [name.strip() for name in spec.split(",") if name.strip()]


def load_configured() -> list[str]:
    """Import the built-in pipelines and every ``ANDON_PIPELINES`` module; returns the names known.
    Raises :class:`PipelineError` with one line naming the module and what is wrong."""
    global _loaded
    with _lock:
        for module in (*BUILTIN_MODULES, *configured_modules()):
            try:
                importlib.import_module(module)
            except PipelineError as exc:
                raise PipelineError(f"ANDON_PIPELINES: module {module!r}: {exc}") from None
            except ImportError as exc:
                raise PipelineError(f"ANDON_PIPELINES: cannot import {module!r}: {exc}") from None
            except Exception as exc:
                raise PipelineError(f"ANDON_PIPELINES: importing {module!r} failed: "
                                    f"{type(exc).__name__}: {exc}") from None
        _loaded = True
        return names()


def _ensure_loaded() -> None:
    if not _loaded:
        load_configured()


def get(name: str) -> Pipeline:
    _ensure_loaded()
    try:
        return _pipelines[name]
    except (KeyError, TypeError):
        raise UnknownPipeline(str(name)[:100], names()) from None


def names() -> list[str]:
    return sorted(_pipelines)


def pipelines() -> list[Pipeline]:
    _ensure_loaded()
    return [_pipelines[name] for name in names()]
