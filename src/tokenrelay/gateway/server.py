"""The uvicorn options the gateway's hardening needs, for whoever builds its uvicorn.Config."""

from __future__ import annotations

from typing import Any

from tokenrelay.settings import Settings


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config(app, **uvicorn_options(settings), ...)`.

    uvicorn believes `X-Forwarded-For` from 127.0.0.1 by default, so any local process
    could pick its own address and slip past the per-client rate limit. Proxy headers
    are read only from the addresses in TOKENRELAY_TRUSTED_PROXIES.

    uvicorn closes an idle keep-alive connection after 5 s, the time httpx keeps one for
    reuse: a client that sent its next request just then had it reset (seen as a
    ReadError on 1 ask in ~1,500 of bursts reusing connections), and nginx keeps idle
    upstream connections 60 s. The gateway keeps them TOKENRELAY_KEEP_ALIVE_S (75 s).
    """
    trusted = list(settings.trusted_proxies)
    return {
        "proxy_headers": bool(trusted),
        # A list, not None: None makes uvicorn fall back to $FORWARDED_ALLOW_IPS or 127.0.0.1.
        "forwarded_allow_ips": trusted or [],
        "server_header": False,
        "timeout_keep_alive": settings.keep_alive_s,
    }
