"""The Host-header allowlist: a page on another site that rebinds its DNS name to 127.0.0.1 (DNS
rebinding) reaches a local stack's port, but its requests still say ``Host: its-name`` — refused here.

Starlette's ``TrustedHostMiddleware`` checks a fixed list; this one also accepts the IP address a
request arrived on (``scope["server"]``: the socket's own address), so an API bound to 0.0.0.0 or to
a LAN address answers requests made to that address without listing it — an IP literal can't be
rebound. It can't help against a name the operator listed that an attacker controls.
"""

from __future__ import annotations

import ipaddress
import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from db.settings import get_settings

#: Paths answered whatever the Host header says: liveness probes come from anywhere, reveal nothing.
EXEMPT_PATHS = frozenset({"/healthz"})


def split_host(value: str) -> tuple[str, str | None]:
    """``host[:port]`` (IPv6 in brackets) → (lower-case host without brackets, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, port
    return value, None  # a bare name, or a bare IPv6 address in the allowlist


def _ip(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def host_allowed(header: str, allowed: list[str], server_host: str | None = None) -> bool:
    if not header:
        return False
    host, port = split_host(header)
    if not host:
        return False
    ip = _ip(host)
    if ip is not None and server_host is not None and ip == _ip(server_host):
        return True
    for entry in allowed:
        if entry == "*":
            return True
        want_host, want_port = split_host(entry)
        if want_port is not None and want_port != port:
            continue
        if want_host.startswith("*."):
            if host.endswith(want_host[1:]):
                return True
        elif (_ip(want_host) or want_host) == (ip or host):
            return True
    return False


class HostAllowlist:
    """400 for a request whose ``Host`` is not in ``ANDON_ALLOWED_HOSTS`` (pure ASGI, outermost)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("host", "")
        server = scope.get("server")
        if host_allowed(header, get_settings().allowed_host_list, server[0] if server else None):
            await self.app(scope, receive, send)
            return
        shown = header[:100] or "(none)"
        body = json.dumps({"detail": f"Host header {shown!r} is not allowed: add it to ANDON_ALLOWED_HOSTS "
                                     "(comma-separated host or host:port) to reach the API by that name"}).encode()
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
