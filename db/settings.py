"""All of andon's configuration, read once from ``ANDON_*`` environment variables.

Unset URLs fall back to the embedded stack: ``andon up`` writes the ports it chose to
``$ANDON_HOME/stack.json`` so that every other command (CLI, worker, API) finds the same Redis.
"""

from __future__ import annotations

import json
import secrets
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_PORT = 6390
DEFAULT_API_PORT = 8000
DEFAULT_FLOWER_PORT = 5555
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "::1")
#: The oldest cutoff a prune takes (a century: any older one is before every job andon ever stored).
MAX_PRUNE_AGE_S = 100 * 365 * 86400.0


class Settings(BaseSettings):
    #: An empty variable means unset (``ANDON_JOB_TIME_LIMIT_S=`` is the default, not a parse error),
    #: so a compose file can pass ``${ANDON_X:-}`` through for every setting.
    model_config = SettingsConfigDict(env_prefix="ANDON_", extra="ignore", env_ignore_empty=True)

    home: Path = Path(".andon")
    broker_url: str | None = None
    redis_url: str | None = None
    database_url: str | None = None
    api_url: str | None = None
    api_token: str | None = None
    #: Tenants and their API tokens, JSON: {"tenant-a": "token-a", ...}. With these set, every /api
    #: route needs a token and a tenant sees only its own jobs. ANDON_API_TOKEN then picks the CLI's.
    api_tokens: dict[str, str] = Field(default_factory=dict)
    #: With ANDON_API_TOKEN set, reads (list, job, partial results, events, pipelines) need it too,
    #: unless this opens them on purpose. Tenants (ANDON_API_TOKENS) always need a token.
    public_reads: bool = False
    #: The one token allowed cross-tenant operations (bulk cancel across tenants, /metrics with
    #: tenants set); it sees every tenant's jobs.
    admin_token: str | None = None
    #: Host headers the API answers (comma-separated host or host:port; ``*`` for any). Unset:
    #: localhost, 127.0.0.1 and ::1. The IP address a request arrived on is always accepted (an IP
    #: literal can't be rebound); a name the API is reached by must be listed. /healthz is exempt.
    allowed_hosts: str | None = None
    #: The longest /readyz waits for each dependency (database, Redis) before calling it down.
    ready_timeout_s: float = Field(2.0, gt=0)
    flower_basic_auth: str | None = None

    #: Seconds a cancellation state lives in Redis; long enough to outlive any job.
    token_ttl_s: int = 7 * 24 * 3600
    #: How often a worker re-reads its active tokens from Redis, in case a pub/sub message was lost.
    token_reconcile_s: float = 1.0
    #: Celery hard time limit per job (None: no limit); the soft limit is this minus the grace.
    job_time_limit_s: float | None = None
    job_soft_time_limit_s: float | None = None
    #: How long a forced stop (Flower Terminate) waits for the job to stop cooperatively.
    terminate_grace_s: float = 5.0
    #: Per-job RSS ceiling in MiB, enforced by a watchdog in the worker child (None: off).
    max_job_rss_mb: float | None = None
    heartbeat_s: float = 2.0
    #: The escalation ladder for a job that ignores its cancel (seconds after the request; per job
    #: with options.escalate_after_s / options.kill_after_s): raise into its thread, then kill.
    escalate_after_s: float = 10.0
    kill_after_s: float = 20.0
    #: When a worker starts, resume the jobs a worker shutdown stopped (each once). On in `andon up`.
    auto_resume: bool = False
    #: On a cold shutdown, how long running jobs get to reach a checkpoint before Celery's SIGTERM.
    cold_shutdown_grace_s: float = 3.0

    #: How long a SQLite writer waits for another's lock before the write fails (and is retried).
    sqlite_busy_timeout_ms: int = 10_000
    #: How often one worker's reaper looks for lost and parked messages (tasks/broker.py).
    broker_sweep_s: float = 30.0
    #: A queued job whose message is in no queue (Redis broker) is sent again after this long.
    lost_message_after_s: float = 120.0
    #: Where the broker can't be inspected (RabbitMQ), a job queued this long is sent again.
    resend_uninspectable_after_s: float = 3600.0
    #: A message delivered and unacked this long whose job has ended is acked by the reaper.
    parked_after_s: float = 120.0
    #: A job that ended this long ago with a Celery result its row disagrees with (PENDING/STARTED,
    #: or an outage stored as FAILURE) gets the state its row implies (tasks/results.py).
    result_settle_after_s: float = 30.0
    #: How far back that sweep looks (it passes over these rows a bounded batch at a time).
    result_settle_window_s: float = 3600.0
    #: Longest wait for one Redis reply (a paused server must not hang a cancel or a heartbeat).
    redis_timeout_s: float = 5.0
    #: The global per-reason policy, JSON: {"timeout": "auto_resume", "resource_limit": "requeue:big"}
    #: (tasks/policy.py); a pipeline's own policy wins over it.
    policy: dict[str, str] = Field(default_factory=dict)
    #: How many times a chain of resumes may be extended by a policy (a pipeline may set its own).
    max_policy_resumes: int = 3
    #: How long a job's run retries a database write that failed for a passing reason (a lock held
    #: past SQLite's busy timeout, a PostgreSQL restart) before it stops the job.
    db_retry_s: float = 30.0
    #: Group commit of finished items (tasks/commits.py): an item is handed to its transaction at
    #: most this long after it ended, together with the others of that window; always before the
    #: job's terminal row. A SIGKILL from outside loses at most this window (resume redoes it). 0:
    #: one transaction per item, in the job's thread.
    item_commit_window_ms: float = Field(5.0, ge=0, le=1000)
    #: How long a stopped job waits for the database to come back to write its end (resumable).
    db_outage_max_s: float = 3600.0
    #: Comma-separated modules that register user pipelines (imported by the worker and the API).
    pipelines: str | None = None
    #: A worker that doesn't know a job's pipeline sends the job back this many times (with backoff)
    #: for a worker that does, then fails it with a clear error.
    unknown_pipeline_retries: int = 60

    llm_base_url: str = "http://127.0.0.1:11434/v1"
    llm_model: str = "llama3.2"
    llm_api_key: str = "not-needed"
    #: Longest wait for the next streamed token before the item fails.
    llm_timeout_s: float = 60.0

    #: An OpenAI-compatible /v1/embeddings endpoint (Ollama, vLLM, OpenAI), for tasks.embeddings.
    embeddings_base_url: str = "http://127.0.0.1:11434/v1"
    embeddings_model: str = "nomic-embed-text"
    embeddings_api_key: str = "not-needed"
    #: Longest wait for the embeddings response before the request fails.
    embeddings_timeout_s: float = 60.0

    #: Open event streams (``GET /api/jobs/{id}/events``) allowed at once per tenant, or per client
    #: address when no tenants are set, in each API process; one more is answered 429.
    max_streams: int = Field(100, ge=1)
    #: How often an open event stream re-reads the database when no notification woke it (a lost
    #: pub/sub message, or Redis away).
    stream_poll_s: float = Field(2.0, gt=0)
    #: Largest request body the API reads; a larger one is answered 413 before parsing or auth.
    max_body_bytes: int = Field(16 * 2**20, ge=1)

    #: Webhooks (tasks/webhooks.py): the key every delivery is signed with, and the hosts (``host`` or
    #: ``host:port``, comma-separated) a ``callback_url`` may reach. Without both, ``callback_url`` is a 422.
    webhook_secret: str | None = None
    webhook_hosts: str | None = None
    #: Deliveries of one event, at most; the waits between them double from ``webhook_backoff_s``
    #: (with jitter): 8 attempts at 5 s span about ten minutes.
    webhook_max_attempts: int = Field(8, ge=1, le=100)
    webhook_backoff_s: float = Field(5.0, gt=0)
    #: Longest one delivery may take (connect, send, read the answer); its task's time limit is a little more.
    webhook_timeout_s: float = Field(10.0, gt=0, le=300)
    #: The Celery queue deliveries go to (unset: the default queue). A worker of its own
    #: (``celery -A tasks.app worker -Q andon-webhooks``) keeps deliveries off the job workers' slots.
    webhook_queue: str | None = None


    def is_admin(self, token: str | None) -> bool:
        """Whether ``token`` is ANDON_ADMIN_TOKEN (never, when that is unset)."""
        if not token or not self.admin_token:
            return False
        return secrets.compare_digest(token.encode(), self.admin_token.encode())

    @property
    def allowed_host_list(self) -> list[str]:
        if self.allowed_hosts is None:
            return list(DEFAULT_ALLOWED_HOSTS)
        return [host.strip().lower() for host in self.allowed_hosts.split(",") if host.strip()]

    @property
    def webhook_host_list(self) -> list[str]:
        return [host.strip().lower() for host in (self.webhook_hosts or "").split(",") if host.strip()]

    def tenant_for(self, token: str | None) -> str | None:
        """The tenant an API token belongs to (None if it belongs to none)."""
        if not token:
            return None
        for tenant, known in self.api_tokens.items():
            if secrets.compare_digest(token.encode(), known.encode()):
                return tenant
        return None

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def stack_file(self) -> Path:
        return self.home_dir / "stack.json"

    def _stack(self) -> dict:
        try:
            return json.loads(self.stack_file.read_text())
        except (OSError, ValueError):
            return {}

    @property
    def redis_port(self) -> int:
        return int(self._stack().get("redis_port", DEFAULT_REDIS_PORT))

    @property
    def resolved_redis_url(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or self.resolved_redis_url

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'andon.db'}"

    @property
    def resolved_api_url(self) -> str:
        port = self._stack().get("api_port", DEFAULT_API_PORT)
        return (self.api_url or f"http://127.0.0.1:{port}").rstrip("/")

    @property
    def jobs_tmp_dir(self) -> Path:
        """Where each job's temp dir lives; it must be empty of a job's dir once the job ends."""
        return self.home_dir / "tmp" / "jobs"


def embedded_env(home: Path, redis_port: int) -> dict[str, str]:
    """The ``ANDON_*`` variables for a stack of one Redis and a SQLite file under ``home`` — what
    ``andon up``, the test session, the benchmark and the chaos harness each run on."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    return {"ANDON_HOME": str(home), "ANDON_REDIS_URL": url, "ANDON_BROKER_URL": url,
            "ANDON_DATABASE_URL": f"sqlite:///{Path(home) / 'andon.db'}"}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
