"""The uvicorn options the gateway's hardening needs, for whoever builds its uvicorn.Config."""

from __future__ import annotations

from typing import Any

from tokenrelay.settings import Settings


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config(app, **uvicorn_options(settings), ...)`.

    uvicorn believes `X-Forwarded-For` from 127.0.0.1 by default, so any local process
    could pick its own address and slip past the per-client rate limit. Proxy headers
    are read only from the addresses in TOKENRELAY_TRUSTED_PROXIES.
    """
    trusted = list(settings.trusted_proxies)
    return {
        "proxy_headers": bool(trusted),
        # A list, not None: None makes uvicorn fall back to $FORWARDED_ALLOW_IPS or 127.0.0.1.
        "forwarded_allow_ips": trusted or [],
        "server_header": False,
    }
