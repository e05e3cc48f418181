"""Dependencies declared once and injected into routes."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tasks.settings import Settings, get_settings

_bearer = HTTPBearer(auto_error=False)


def require_writer(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> str:
    """Writes need ``Authorization: Bearer $ANDON_API_TOKEN`` when a token is configured."""
    if not settings.api_token:
        return "anonymous"
    if credentials is None or not secrets.compare_digest(credentials.credentials, settings.api_token):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    return "token"


WriterDep = Annotated[str, Depends(require_writer)]
