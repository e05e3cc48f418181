"""Every path andon builds from a job id, and the one check that keeps it under andon's own root.

A job id can come from outside the API (a broker message, Flower's apply, ``send_task`` with a chosen
``task_id``), so it is untrusted: it must look like an id before it names anything, and a path built
from it is resolved and checked to stay inside ``jobs_tmp_dir`` before it is made or removed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from db.settings import get_settings
from tasks.errors import InvalidJobId

__all__ = ["JOB_ID_PATTERN", "check_job_id", "contained", "job_scratch_dir", "remove_tree"]

#: A UUID, or any id of 1-36 letters, digits, ``-`` and ``_`` (no dots, slashes or spaces).
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,35}$"
_JOB_ID = re.compile(JOB_ID_PATTERN)


def check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        shown = repr(job_id)[:80]
        raise InvalidJobId(f"invalid job id {shown}: 1-36 letters, digits, '-' or '_'")
    return job_id


def contained(path: Path, root: Path) -> Path:
    """``path`` resolved, if it lies strictly inside ``root`` (also resolved); else InvalidJobId."""
    resolved, base = path.resolve(), root.resolve()
    if resolved == base or base not in resolved.parents:
        raise InvalidJobId(f"path {str(path)[:120]!r} escapes {base}")
    return resolved


def job_scratch_dir(job_id: str, run: int | None = None) -> Path:
    """Where a job's scratch files live (``run``: one run's own part of it): removed on every exit
    path of the job."""
    root = get_settings().jobs_tmp_dir
    path = root / check_job_id(job_id)
    if run is not None:
        path = path / f"run-{int(run)}"
    return contained(path, root)


def remove_tree(path: Path) -> None:
    """Remove a directory under ``jobs_tmp_dir``, and nothing anywhere else."""
    root = get_settings().jobs_tmp_dir
    target = contained(path, root)
    if target.is_symlink():
        target.unlink()
    else:
        shutil.rmtree(target, ignore_errors=True)
