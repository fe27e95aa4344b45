"""Which proxy the model client goes through, from the environment as httpx read it.

`urllib.request.getproxies()`'s mapping (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY, in
either case): an http:// or https:// proxy per scheme, `all` for the rest, NO_PROXY's hosts
and domains reached directly. An https origin is reached through a CONNECT tunnel, an http
one by naming the whole URL to the proxy (`h1pool`).
"""

from __future__ import annotations

import base64
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from tokenrelay.errors import ConfigError
from tokenrelay.providers.h1 import DEFAULT_PORTS, Origin


@dataclass(frozen=True, slots=True)
class Proxy:
    origin: Origin
    authorization: bytes  # the Proxy-Authorization header line, or b""


class Proxies:
    def __init__(self, given: Mapping[str, str]) -> None:
        """Checked now (a SOCKS proxy is a `ConfigError`), not at the first request."""
        schemes = ("http", "https", "all")
        self._by_scheme = {s: _proxy(s, url) for s in schemes if (url := given.get(s))}
        self._no_proxy = {"no": given["no"]} if given.get("no") else {}
        self._routes: dict[Origin, Proxy | None] = {}

    def route(self, origin: Origin) -> Proxy | None:
        """The proxy to reach an origin through, or None for a direct connection."""
        if origin not in self._routes:
            proxy = self._by_scheme.get(origin.scheme) or self._by_scheme.get("all")
            bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
            if proxy is not None and self._no_proxy and bypass(origin.host, self._no_proxy):
                proxy = None
            self._routes[origin] = proxy
        return self._routes[origin]


def _proxy(scheme: str, url: str) -> Proxy:
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ConfigError(
            f"the {scheme} proxy is {parts.scheme}://…; tokenrelay's model client goes "
            "through http:// and https:// proxies only"
        )
    authorization = b""
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        secret = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{secret}".encode())
        authorization = b"proxy-authorization: Basic " + token + b"\r\n"
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    return Proxy(Origin(parts.scheme, parts.hostname, port), authorization)
