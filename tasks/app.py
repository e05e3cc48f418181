"""The Celery entry point: ``celery -A tasks.app worker`` / ``celery -A tasks.app flower``.

The app itself is plain (:mod:`tasks.celery_app`); :func:`tasks.wiring.install` adds andon to it —
its tasks, signal handlers, remote-control commands and request class — in one visible step.
"""

from __future__ import annotations

from tasks.celery_app import app
from tasks.wiring import install

__all__ = ["app"]

install(app)
