"""Dependencies declared once and injected into routes: who is calling, and for which tenant."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from typing import Annotated

from fastapi import Depends, Header, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from db.settings import Settings, get_settings
from db.vocabulary import CancellationSource

_bearer = HTTPBearer(auto_error=False)


@dataclass(frozen=True)
class Caller:
    """Who is calling. ``tenant`` scopes every job query; None means unscoped (no tenants set, or
    the admin token)."""

    actor: str
    tenant: str | None = None
    #: ANDON_ADMIN_TOKEN: unscoped, and the only caller allowed cross-tenant operations.
    admin: bool = False
    #: The source a cancel from this caller is recorded with: ``cli`` when the request says
    #: ``X-Andon-Client: cli`` (the andon CLI over HTTP), else ``api``.
    source: CancellationSource = CancellationSource.API


def _unauthorized() -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token",
                         headers={"WWW-Authenticate": "Bearer"})


def _caller(credentials: HTTPAuthorizationCredentials | None, settings: Settings, write: bool) -> Caller:
    """Who is calling, or 401.

    - ANDON_ADMIN_TOKEN, when set, is accepted everywhere and sees every tenant's jobs.
    - Tenants (ANDON_API_TOKENS): every /api route needs a tenant's token; it sees its own jobs only.
    - One ANDON_API_TOKEN: every /api route needs it, reads included, unless ANDON_PUBLIC_READS=1
      opens the reads on purpose.
    - No token set: open (the API warns at start).
    """
    token = credentials.credentials if credentials else None
    if settings.is_admin(token):
        return Caller(actor="api:admin", admin=True)
    if settings.api_tokens:
        tenant = settings.tenant_for(token)
        if tenant is None:
            raise _unauthorized()
        return Caller(actor=f"api:{tenant}", tenant=tenant)
    if settings.api_token:
        if token is not None and secrets.compare_digest(token.encode(), settings.api_token.encode()):
            return Caller(actor="api:token")
        if write or not settings.public_reads:
            raise _unauthorized()
    return Caller(actor="api:anonymous")


async def current_settings() -> Settings:
    """The settings, as a dependency. ``async`` on purpose, like the two below: they do no I/O, and a
    sync dependency would take a worker thread for each request (each open event stream) just to run."""
    return get_settings()


async def reader(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    settings: Annotated[Settings, Depends(current_settings)],
) -> Caller:
    return _caller(credentials, settings, write=False)


async def writer(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    settings: Annotated[Settings, Depends(current_settings)],
    x_andon_client: Annotated[str | None, Header(description="`cli`: the andon CLI (cancels recorded with "
                                                             "source `cli`)", max_length=64)] = None,
) -> Caller:
    caller = _caller(credentials, settings, write=True)
    if x_andon_client == "cli":
        return replace(caller, source=CancellationSource.CLI)
    return caller


async def metrics_reader(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    settings: Annotated[Settings, Depends(current_settings)],
) -> None:
    """/metrics counts every tenant's jobs: with tenants set, only the admin token may read it.
    Without tenants it stays as open as /healthz (one operator, nothing to leak between tenants)."""
    if settings.api_tokens and not settings.is_admin(credentials.credentials if credentials else None):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            "with tenants set, /metrics needs the admin token (ANDON_ADMIN_TOKEN)",
                            headers={"WWW-Authenticate": "Bearer"})


async def operator(
    caller: Annotated[Caller, Depends(writer)],
    settings: Annotated[Settings, Depends(current_settings)],
) -> Caller:
    """Operations across every tenant's jobs (prune): a writer; with tenants set, the admin token only."""
    if settings.api_tokens and not caller.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "with tenants set, this needs the admin token (ANDON_ADMIN_TOKEN)")
    return caller


ReaderDep = Annotated[Caller, Depends(reader)]
WriterDep = Annotated[Caller, Depends(writer)]
OperatorDep = Annotated[Caller, Depends(operator)]
