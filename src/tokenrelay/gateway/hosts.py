"""Which Host names and browser origins the gateway answers to (a DNS-rebinding guard).

A page on `evil.example` whose name an attacker re-points at 127.0.0.1 reaches the
gateway with `Host: evil.example:PORT` and a matching `Origin`; anything that trusts
"Origin equals Host" lets it in. So the Host header is checked against an allow-list
(any port) on every HTTP request and WebSocket, before Socket.IO or FastAPI see it, and
Socket.IO's allowed origins are an explicit set built from the settings, never the Host.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from urllib.parse import urlsplit

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenrelay.settings import Settings

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_WILDCARD_BINDS = ("", "0.0.0.0", "[::]")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normal_host(name: str) -> str:
    """A host name as compared: lower case, no trailing dot, IPv6 in brackets."""
    name = name.strip().lower().rstrip(".")
    if ":" in name and not name.startswith("["):
        return f"[{name}]"  # a bare IPv6 address, as a setting may spell it
    return name


def host_of(header: str) -> str:
    """The host part of a `Host` header value (`name`, `name:port`, `[v6]:port`)."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[: end + 1] if end > 0 else header
    return header.partition(":")[0].rstrip(".")


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The names the gateway answers to; None when `*` turns the check off."""
    if settings.allowed_hosts:
        if "*" in settings.allowed_hosts:
            return None
        return frozenset(normal_host(h) for h in settings.allowed_hosts)
    hosts = {*LOOPBACK_NAMES, normal_host(settings.host)}
    if normal_host(settings.host) in _WILDCARD_BINDS:
        # Bound to every interface: the machine's own name too; other names must be listed.
        hosts.discard(normal_host(settings.host))
        hosts.add(normal_host(socket.gethostname()))
    return frozenset(hosts)


class OriginPolicy:
    """Socket.IO's allowed origins (engine.io calls this with the Origin and the environ).

    Allowed: every origin in TOKENRELAY_CORS_ORIGINS, and `http(s)://<allowed host>:<port>`
    where the port is the one this server listens on (a page it served itself), or the
    scheme's default port for names listed in TOKENRELAY_ALLOWED_HOSTS (a TLS proxy in
    front). The Host header plays no part.
    """

    def __init__(self, settings: Settings) -> None:
        self.listed = frozenset(o.rstrip("/").lower() for o in settings.cors_origins)
        self.hosts = allowed_hosts(settings)
        named = settings.allowed_hosts if "*" not in settings.allowed_hosts else []
        self.named = frozenset(normal_host(h) for h in named)
        self.port = settings.port

    def allows(self, origin: str, listening_port: int) -> bool:
        origin = origin.rstrip("/").lower()
        if origin in self.listed:
            return True
        if self.hosts is None:
            return False
        try:
            parts = urlsplit(origin)
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme, -1)
        except ValueError:
            return False
        host = normal_host(parts.hostname or "")
        if parts.scheme not in ("http", "https") or host not in self.hosts:
            return False
        return port == listening_port or (host in self.named and parts.port is None)

    def __call__(self, origin: str | None, environ: Mapping[str, object]) -> bool:
        if origin is None:
            return True  # not a browser: engine.io only asks when there is an Origin
        scope = environ.get("asgi.scope")
        server = scope.get("server") if isinstance(scope, Mapping) else None
        port = server[1] if isinstance(server, list | tuple) and len(server) == 2 else self.port
        return self.allows(origin, int(port or self.port))


class HostGuard:
    """400 (WebSocket: 403) for a Host header not on the allow-list; lifespan passes."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.hosts is None or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"host"), None)
        host = host_of(header.decode("latin-1")) if header is not None else ""
        if host in self.hosts:
            await self.app(scope, receive, send)
            return
        shown = repr(host[:100]) if header is not None else "missing"
        message = (
            f"host {shown} is not served here; "
            "the operator can allow it with TOKENRELAY_ALLOWED_HOSTS"
        )
        log.debug("refused a request for host %s", shown)
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            # Closing before accepting: uvicorn answers the handshake with 403.
            await send({"type": "websocket.close", "code": 1008, "reason": "host not allowed"})
            return
        body = orjson.dumps({"error": message})
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
