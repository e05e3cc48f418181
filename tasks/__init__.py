"""andon's worker side and its public Python API: write a pipeline, andon runs it cancellably.

```python
from tasks import JobContext, Pipeline, stage
```

Everything else in this package (the runner, the Celery wiring, the cancellation core) is andon's own.
"""

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
