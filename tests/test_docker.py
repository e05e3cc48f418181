"""Opt-in: the same app in pytest-celery's Docker containers, where a Docker engine exists.

Not run by default (no Docker engine here or in CI). Run with ``pytest -p celery -m docker``; the
``-p celery`` brings back pytest-celery's plugin that ``addopts`` disables.
"""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.docker


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker CLI and a running Docker engine")
def test_celery_setup_in_containers_is_ready(request):
    celery_setup = request.getfixturevalue("celery_setup")  # pytest-celery's containerized broker/backend/worker
    assert celery_setup.ready()
