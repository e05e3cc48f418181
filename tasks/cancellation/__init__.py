"""The cancellation core: the token a job checks, the errors a cancel raises, and the Redis side that
carries a cancel from whoever asks to the process running the job.

Compare dramatiq's ``abortable/``: the token is the local, microsecond-cheap truth a checkpoint
reads; the store is the durable one in Redis (the job row is the other); the watcher copies the
store into the tokens of the jobs this process runs.
"""

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
