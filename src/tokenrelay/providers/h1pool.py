"""A small HTTP/1.1 client for the model's streamed answers: kept-alive connections per
origin, TLS, HTTP proxies, redirects, and a response read as its bytes arrive.

What httpx did for the `openai` provider, kept: at most `max_idle` idle connections per
origin, none older than `keepalive_s`, and never a wait for one (a new one is opened);
a connection the server closed while it sat idle is noticed and the request sent again
once on a new one; a connection whose response was not read to its end is closed, never
reused; redirects followed as httpx follows them (Authorization dropped for another
origin); the proxy variables as httpx read them (`urllib.request.getproxies()`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from tokenrelay.errors import ConfigError
from tokenrelay.providers.h1 import (
    DEFAULT_PORTS,
    Connection,
    Decoder,
    HTTPFailure,
    HTTPTimeout,
    Origin,
    StaleConnection,
)
from tokenrelay.providers.h1proxy import Proxies, Proxy

_HAPPY_EYEBALLS_S = 0.25  # what AnyIO's connect used
_MAX_REDIRECTS = 20  # httpx's
_REDIRECT_BODY_BYTES = 64 * 1024


class Response:
    """A response whose body is read as it arrives; `close` hands the connection back."""

    def __init__(
        self, client: H1Client, conn: Connection, url: str, headers: dict[str, str]
    ) -> None:
        self.status = conn.status
        self.headers = headers
        self.url = url
        self._client = client
        self._conn = conn
        self._closed = False
        encoding = headers.get("content-encoding", "identity").strip().lower()
        self._plain = encoding in ("identity", "")
        self.read: Callable[[], Awaitable[bytes]] = (
            conn.read if self._plain else self._decoded(Decoder(encoding))
        )

    def divert(self, sink: Callable[[bytes], bool]) -> bool:
        """The body's pieces to `sink` as they arrive (`Connection.divert`); `read` then
        waits for the end. False, nothing diverted, for an encoded body."""
        if self._plain:
            self._conn.divert(sink)
        return self._plain

    async def drain(self, timeout_s: float) -> None:
        """Read what is left of the body for at most `timeout_s` (its end keeps the
        connection); a connection that breaks or lags is closed instead."""
        conn = self._conn
        kept, conn.timeout_s = conn.timeout_s, timeout_s
        try:
            while await conn.read():
                pass
        except HTTPFailure:
            pass
        finally:
            conn.timeout_s = kept

    async def read_some(self, limit: int) -> bytes:
        """Up to `limit` bytes of the body (an error's), then closes; a body cut off reads
        as what arrived."""
        raw = b""
        try:
            while len(raw) < limit and (data := await self.read()):
                raw += data
        except HTTPFailure:
            pass
        finally:
            self.close()
        return raw[:limit]

    def close(self) -> None:
        if not self._closed:  # twice would close a connection another request now uses
            self._closed = True
            self._client.release(self._conn)

    def _decoded(self, decoder: Decoder) -> Callable[[], Awaitable[bytes]]:
        read = self._conn.read

        async def decoded() -> bytes:
            while data := await read():
                if out := decoder.decode(data):
                    return out
            return decoder.decode(b"")

        return decoded


class H1Client:
    def __init__(
        self,
        headers: Mapping[str, str],
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_idle: int,
        keepalive_s: float,
        ssl_context: ssl.SSLContext | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> None:
        # The same header lines on every request; Authorization apart, for another origin.
        lines = {k.lower(): v for k, v in headers.items()}
        self._authorization = _header_lines({"authorization": lines.pop("authorization", "")})
        self._headers = _header_lines(
            {"accept-encoding": "gzip, deflate", "connection": "keep-alive", **lines}
        )
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._max_idle = max_idle
        self._keepalive_s = keepalive_s
        self._ssl = ssl_context or ssl.create_default_context()
        self._ssl.set_alpn_protocols(["http/1.1"])
        self._proxies = Proxies(proxies or {})
        self._idle: dict[Origin, list[Connection]] = {}

    async def post(self, url: str, body: bytes) -> Response:
        """The response to a POST, after redirects; its body not yet read."""
        method, authorized, start = "POST", True, _origin(url)
        for _ in range(_MAX_REDIRECTS + 1):
            response = await self._send(method, url, body if method == "POST" else None, authorized)
            location = response.headers.get("location")
            if response.status not in (301, 302, 303, 307, 308) or location is None:
                return response
            await response.read_some(_REDIRECT_BODY_BYTES)
            url = urllib.parse.urljoin(url, location)
            if response.status in (301, 302, 303):
                method = "GET"  # as httpx (and browsers) do
            authorized = authorized and _same_or_upgraded(start, _origin(url))
            start = _origin(url)
        raise HTTPFailure("Exceeded maximum allowed redirects.")

    def release(self, conn: Connection) -> None:
        """Take back a connection whose response is done; kept if it can serve again."""
        if not conn.finish():
            return
        idle = self._idle.setdefault(conn.origin, [])
        now = asyncio.get_running_loop().time()
        while idle and now - idle[0].idle_since >= self._keepalive_s:
            idle.pop(0).close()
        if len(idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = now
        idle.append(conn)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    async def _send(self, method: str, url: str, body: bytes | None, authorized: bool) -> Response:
        origin = _origin(url)
        conn = self._take_idle(origin)
        if conn is not None:
            try:
                return await self._exchange(conn, method, url, body, authorized)
            except StaleConnection:
                pass  # the server closed it while it sat idle: once more, on a new one
        conn = await self._connect(origin)
        return await self._exchange(conn, method, url, body, authorized)

    async def _exchange(
        self, conn: Connection, method: str, url: str, body: bytes | None, authorized: bool
    ) -> Response:
        proxy = self._proxies.route(conn.origin)
        parts = urllib.parse.urlsplit(url)
        # An http:// request through a proxy names the whole URL; a tunnel's does not.
        forwarded = proxy is not None and conn.origin.scheme == "http"
        target = url.split("#")[0] if forwarded else _target(parts)
        request = b"".join(
            (
                f"{method} {target} HTTP/1.1\r\nhost: {conn.origin.authority}\r\n".encode("ascii"),
                self._headers,
                self._authorization if authorized else b"",
                proxy.authorization if forwarded and proxy is not None else b"",
                b"" if body is None else b"content-length: %d\r\n" % len(body),
                b"\r\n",
                body or b"",
            )
        )
        conn.timeout_s = self._read_timeout_s
        try:
            conn.send(request)
            return Response(self, conn, url, await conn.head())
        except BaseException:  # an encoding it cannot read included
            conn.close()
            raise

    def _take_idle(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()
            if conn.usable() and now - conn.idle_since < self._keepalive_s:
                return conn
            conn.close()
        return None

    async def _connect(self, origin: Origin) -> Connection:
        proxy = self._proxies.route(origin)
        first = origin if proxy is None else proxy.origin
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                conn = await self._open(first, origin)
                if proxy is not None and origin.scheme == "https":
                    await self._tunnel(conn, origin, proxy)
        except HTTPFailure:
            raise
        except TimeoutError as e:
            raise HTTPTimeout("connect timed out") from e
        except OSError as e:  # ssl.SSLError included
            raise HTTPFailure(str(e) or type(e).__name__) from e
        return conn

    async def _open(self, to: Origin, origin: Origin) -> Connection:
        loop = asyncio.get_running_loop()
        options: dict[str, Any] = {}
        if to.scheme == "https":
            options = {"ssl": self._ssl, "server_hostname": to.host}
        # asyncio's loop races IPv6 and IPv4 as AnyIO did; uvloop's has no such option. An
        # IP address has nothing to race, and the race costs ~100 us of CPU per connect.
        if isinstance(loop, asyncio.BaseEventLoop) and not _is_address(to.host):
            options["happy_eyeballs_delay"] = _HAPPY_EYEBALLS_S
        _, conn = await loop.create_connection(
            lambda: Connection(loop, origin), to.host, to.port, **options
        )
        return conn

    async def _tunnel(self, conn: Connection, origin: Origin, proxy: Proxy) -> None:
        """CONNECT through the proxy, then TLS with the origin inside the tunnel."""
        where = (
            f"[{origin.host}]:{origin.port}"
            if ":" in origin.host
            else f"{origin.host}:{origin.port}"
        )
        try:
            conn.send(
                b"CONNECT %s HTTP/1.1\r\nhost: %s\r\n%s\r\n"
                % (where.encode("ascii"), where.encode("ascii"), proxy.authorization)
            )
            await conn.head()
            if not 200 <= conn.status < 300:
                raise HTTPFailure(f"the proxy refused to connect to {where} ({conn.status})")
            conn.tunnelled()
            loop = asyncio.get_running_loop()
            tls = await loop.start_tls(conn.transport, conn, self._ssl, server_hostname=origin.host)
            if tls is None:
                raise HTTPFailure("the connection closed during the TLS handshake")
            conn.transport = tls
        except BaseException:
            conn.close()
            raise


def _origin(url: str) -> Origin:
    try:
        parts = urllib.parse.urlsplit(url)
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError as e:
        raise HTTPFailure(f"Invalid URL {url!r}: {e}") from e
    if scheme not in DEFAULT_PORTS:
        raise HTTPFailure("Request URL is missing an 'http://' or 'https://' protocol.")
    if not host:
        raise HTTPFailure(f"Invalid URL {url!r}: no host")
    return Origin(scheme, host, port or DEFAULT_PORTS[scheme])


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _target(parts: urllib.parse.SplitResult) -> str:
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _same_or_upgraded(before: Origin, after: Origin) -> bool:
    """Whether Authorization may follow a redirect: the same origin, or http upgraded to
    https on the same host and default ports (httpx's rule)."""
    if before == after:
        return True
    return (
        before.host == after.host
        and before.scheme == "http"
        and before.port == 80
        and after.scheme == "https"
        and after.port == 443
    )


def _header_lines(headers: Mapping[str, str]) -> bytes:
    out = b""
    for name, value in headers.items():
        if not value:
            continue
        if any(c in value for c in "\r\n\0") or any(c in name for c in "\r\n\0: "):
            raise ConfigError(f"the {name} header holds a character a header cannot carry")
        out += f"{name}: {value}\r\n".encode("ascii")
    return out
