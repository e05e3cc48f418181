"""andon's worker side and its public Python API: write a pipeline, andon runs it cancellably.

```python
from tasks import JobContext, Pipeline, stage
```

Everything else in this package (the runner, the Celery wiring, the cancellation core) is andon's own.
The public names are imported on first use (:mod:`tasks.lazy`): a process that needs one small
module of the package (the ``andon`` CLI's job verbs: its errors and tag rules) doesn't import the
runner, the database layer and Celery with it, which cost every ``andon ls`` about a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.lazy import lazy_exports

if TYPE_CHECKING:
    from db.vocabulary import CancellationReason
    from tasks.cancellation import CancellationError, CancellationToken, ForcedCancellation
    from tasks.cleanup import CleanupManager
    from tasks.context import JobContext
    from tasks.pipeline import LocalRun, Pipeline, Stage, stage
    from tasks.retry import Retry

__all__ = [
    "CancellationError", "CancellationReason", "CancellationToken", "CleanupManager", "ForcedCancellation",
    "JobContext", "LocalRun", "Pipeline", "Retry", "Stage", "stage",
]

__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    "CancellationReason": "db.vocabulary",
    "CancellationError": "tasks.cancellation", "CancellationToken": "tasks.cancellation",
    "ForcedCancellation": "tasks.cancellation",
    "CleanupManager": "tasks.cleanup",
    "JobContext": "tasks.context",
    "LocalRun": "tasks.pipeline", "Pipeline": "tasks.pipeline", "Stage": "tasks.pipeline", "stage": "tasks.pipeline",
    "Retry": "tasks.retry",
})
