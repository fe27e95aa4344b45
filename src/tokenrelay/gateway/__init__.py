"""The gateway: one ASGI app serving Socket.IO, HTTP/SSE and the web page."""

from tokenrelay.gateway.app import create_app

__all__ = ["create_app"]
