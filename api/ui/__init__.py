"""The job dashboard: ``GET /ui`` (jobs) and ``GET /ui/jobs/{id}`` (one job), served by the API itself.

One HTML page, one script, one stylesheet, shipped in this package (no build step, no CDN: it works
offline). The page reads the API with ``fetch()``, the bearer token in the ``Authorization`` header
(asked for when the API answers 401, kept in ``sessionStorage``: this browser tab only) and never in
a URL or a cookie, so a write can't be forged by another site; its live feed is ``GET /api/events``,
read with ``fetch()`` too (an ``EventSource`` can't send headers).

The page itself is public (it holds no data); every byte of data comes from ``/api``, which checks
the token. Its Content-Security-Policy allows this origin's script and style only: the page builds
the DOM from text, never from HTML it was sent.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response

STATIC = Path(__file__).parent / "static"
#: The only files served, and their types: a name not here is 404 (no path ever reaches the disk).
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(prefix="/ui", include_in_schema=False)


@lru_cache(maxsize=None)
def _asset(name: str) -> tuple[bytes, str]:
    body = (STATIC / name).read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:16] + '"'


def _page(request: Request) -> Response:
    """The one page; the script reads the path to know which view to show."""
    root = request.scope.get("root_path", "").rstrip("/")
    version = _asset("app.js")[1].strip('"') + _asset("app.css")[1].strip('"')[:4]
    html = _asset("index.html")[0].decode().replace("{{root}}", root).replace("{{version}}", version)
    return Response(html, media_type="text/html; charset=utf-8",
                    headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})


@router.get("")
@router.get("/")
def jobs_page(request: Request) -> Response:
    return _page(request)


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str) -> Response:
    return _page(request)


@router.get("/static/{name}")
def asset(name: str, request: Request) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, "no such file")
    body, etag = _asset(name)
    headers = {**SECURITY_HEADERS, "ETag": etag, "Cache-Control": "public, max-age=31536000, immutable"
               if request.query_params.get("v") else "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=ASSETS[name], headers=headers)
