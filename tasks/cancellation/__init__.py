"""The cancellation core: the token a job checks, the errors a cancel raises, and the Redis side that
carries a cancel from whoever asks to the process running the job.

Compare dramatiq's ``abortable/``: the token is the local, microsecond-cheap truth a checkpoint
reads; the store is the durable one in Redis (the job row is the other); the watcher copies the
store into the tokens of the jobs this process runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.lazy import lazy_exports

if TYPE_CHECKING:
    from tasks.cancellation import keys
    from tasks.cancellation.errors import CancellationError, ForcedCancellation, cancellation_in
    from tasks.cancellation.queued import QueuedCancels
    from tasks.cancellation.store import CancellationStore
    from tasks.cancellation.token import CancellationToken, CancelRequest
    from tasks.cancellation.watcher import TokenWatcher

__all__ = [
    "CancelRequest", "CancellationError", "CancellationStore", "CancellationToken", "ForcedCancellation",
    "QueuedCancels", "TokenWatcher", "cancellation_in", "keys",
]

# imported on first use (tasks.lazy): the errors alone don't need Redis and the watcher's threads
__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    "keys": "tasks.cancellation.keys",
    "CancellationError": "tasks.cancellation.errors", "ForcedCancellation": "tasks.cancellation.errors",
    "cancellation_in": "tasks.cancellation.errors",
    "QueuedCancels": "tasks.cancellation.queued",
    "CancellationStore": "tasks.cancellation.store",
    "CancellationToken": "tasks.cancellation.token", "CancelRequest": "tasks.cancellation.token",
    "TokenWatcher": "tasks.cancellation.watcher",
})
