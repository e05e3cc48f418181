"""Dependencies declared once and injected into routes: who is calling, and for which tenant."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from db.settings import Settings, get_settings

_bearer = HTTPBearer(auto_error=False)


@dataclass(frozen=True)
class Caller:
    """Who is calling. ``tenant`` scopes every job query; None means unscoped (no tenants set)."""

    actor: str
    tenant: str | None = None


def _unauthorized() -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token",
                         headers={"WWW-Authenticate": "Bearer"})


def _caller(credentials: HTTPAuthorizationCredentials | None, settings: Settings, write: bool) -> Caller:
    token = credentials.credentials if credentials else None
    if settings.api_tokens:  # tenants: every /api route needs a token, and sees only its tenant's jobs
        tenant = settings.tenant_for(token)
        if tenant is None:
            raise _unauthorized()
        return Caller(actor=f"api:{tenant}", tenant=tenant)
    if settings.api_token and write:  # one token: writes need it, reads stay open
        if token is None or not secrets.compare_digest(token.encode(), settings.api_token.encode()):
            raise _unauthorized()
        return Caller(actor="api:token")
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
) -> Caller:
    return _caller(credentials, settings, write=True)


ReaderDep = Annotated[Caller, Depends(reader)]
WriterDep = Annotated[Caller, Depends(writer)]
