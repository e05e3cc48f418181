"""Releasing what a job acquired — temp files, temp dirs, callbacks — on every exit path."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


class CleanupManager:
    """Collects cleanup actions and runs them once, newest first.

    ``run()`` never raises: each failure is collected and returned, so cleanup can't mask the job's
    real outcome (the caller stores the errors as a ``cleanup_failed`` event).
    """

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], Any]]] = []
        self._done = False

    def register(self, action: Callable[[], Any], description: str | None = None) -> None:
        self._actions.append((description or getattr(action, "__name__", repr(action)), action))

    def temp_dir(self, path: Path | None = None, **mkdtemp_kwargs: Any) -> Path:
        """Make a temp dir (at ``path`` if given) that is removed at cleanup."""
        if path is None:
            path = Path(tempfile.mkdtemp(**mkdtemp_kwargs))
        else:
            path.mkdir(parents=True, exist_ok=True)
        self.register(lambda: shutil.rmtree(path) if path.exists() else None, f"remove dir {path}")
        return path

    def temp_file(self, **mkstemp_kwargs: Any) -> Path:
        fd, name = tempfile.mkstemp(**mkstemp_kwargs)
        os.close(fd)
        path = Path(name)
        self.register(lambda: path.unlink(missing_ok=True), f"remove file {path}")
        return path

    @property
    def done(self) -> bool:
        return self._done

    def run(self) -> list[str]:
        """Run every action in reverse order of registration; return one line per failure."""
        if self._done:
            return []
        self._done = True
        errors = []
        for description, action in reversed(self._actions):
            try:
                action()
            except Exception as exc:
                errors.append(f"{description}: {type(exc).__name__}: {exc}")
        return errors
