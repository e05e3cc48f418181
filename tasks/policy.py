"""What happens after a stop depends on why: a per-reason policy.

Each reason maps to one action: ``final`` (the job stays cancelled), ``resumable`` (a person or
service may resume it), ``auto_resume`` (resumed at once) or ``requeue:<queue>`` (resumed at once on
another queue — e.g. ``resource_limit`` → workers with more memory). The default is andon's
behaviour before policies: ``timeout`` and ``system_shutdown`` resumable, the rest final.
``ANDON_POLICY`` (JSON) changes the default for every pipeline, ``Pipeline(policy=...)`` for one.

Limits, by design: ``user_requested`` and ``dependency_failed`` never resume by themselves (a person
asked to stop; a parent failed), a superseded job is never resumed by a policy, and a job is resumed
by policy at most ``max_resumes`` times along its chain of resumes — no loops.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from db.settings import get_settings
from db.vocabulary import CancellationReason
from tasks import registry
from tasks.errors import PipelineError, UnknownPipeline

__all__ = ["AUTO_RESUME", "DEFAULT_POLICY", "FINAL", "NEVER_AUTOMATIC", "REQUEUE", "RESUMABLE", "PolicyError", "check_policy",
           "check_global", "max_resumes_for", "policy_for", "resumable"]

FINAL, RESUMABLE, AUTO_RESUME, REQUEUE = "final", "resumable", "auto_resume", "requeue:"
DEFAULT_POLICY: dict[CancellationReason, str] = {
    CancellationReason.USER_REQUESTED: FINAL,
    CancellationReason.TIMEOUT: RESUMABLE,
    CancellationReason.SYSTEM_SHUTDOWN: RESUMABLE,
    CancellationReason.RESOURCE_LIMIT: FINAL,
    CancellationReason.DEPENDENCY_FAILED: FINAL,
}
NEVER_AUTOMATIC = frozenset({CancellationReason.USER_REQUESTED, CancellationReason.DEPENDENCY_FAILED})
_QUEUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


class PolicyError(PipelineError):
    """A policy that names an unknown reason or action, or lets a reason resume that can't."""


def check_policy(raw: Mapping[str, Any] | None, where: str) -> dict[CancellationReason, str]:
    """A policy mapping, checked: reasons and actions spelled right, no automatic resume where none
    is allowed. Raises :class:`PolicyError` naming ``where`` and the entry."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: a policy maps reasons to actions, got {type(raw).__name__}")
    checked: dict[CancellationReason, str] = {}
    for key, action in raw.items():
        try:
            reason = CancellationReason(key)
        except ValueError:
            raise PolicyError(f"{where}: unknown reason {key!r} (choose from "
                              f"{', '.join(r.value for r in CancellationReason)})") from None
        if not isinstance(action, str) or not (action in (FINAL, RESUMABLE, AUTO_RESUME) or (
                action.startswith(REQUEUE) and _QUEUE.fullmatch(action[len(REQUEUE):]))):
            raise PolicyError(f"{where}: {reason.value}: unknown action {action!r} (final, resumable, "
                              "auto_resume or requeue:<queue>)")
        if reason in NEVER_AUTOMATIC and action not in (FINAL, RESUMABLE):
            raise PolicyError(f"{where}: {reason.value} can't resume by itself (final or resumable)")
        checked[reason] = action
    return checked


def check_global() -> None:
    """ANDON_POLICY, checked at start (the worker, the API, ``andon up``): a clear error, not a
    surprise at the first stop."""
    check_policy(get_settings().policy, "ANDON_POLICY")


def policy_for(pipeline: str | None) -> dict[CancellationReason, str]:
    """The policy a job of ``pipeline`` stops under: the default, ANDON_POLICY, the pipeline's own."""
    policy = {**DEFAULT_POLICY, **check_policy(get_settings().policy, "ANDON_POLICY")}
    if pipeline:
        try:
            policy.update(registry.get(pipeline).policy)
        except UnknownPipeline:
            pass
    return policy


def resumable(pipeline: str | None, reason: CancellationReason | str) -> bool:
    return policy_for(pipeline)[CancellationReason(reason)] != FINAL


def max_resumes_for(pipeline: str | None) -> int:
    try:
        return registry.get(pipeline).max_resumes if pipeline else get_settings().max_policy_resumes
    except UnknownPipeline:
        return get_settings().max_policy_resumes
