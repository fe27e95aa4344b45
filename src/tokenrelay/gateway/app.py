"""The ASGI app factory and its one lifespan, which owns every resource."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import socketio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenrelay import logs, metrics
from tokenrelay.children import read_state
from tokenrelay.gateway import error_replies, sse
from tokenrelay.gateway.access import Access
from tokenrelay.gateway.engine import LeanServer
from tokenrelay.gateway.headers import SecurityHeaders
from tokenrelay.gateway.hosts import HostGuard, OriginPolicy, allowed_hosts
from tokenrelay.gateway.http import router
from tokenrelay.gateway.openai_compat import router as openai_router
from tokenrelay.gateway.packets import TolerantPacket
from tokenrelay.gateway.quick_routes import QuickRoutes
from tokenrelay.gateway.sockets import SocketGateway
from tokenrelay.services import Services, open_services
from tokenrelay.settings import Settings, load_settings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
FRONT_DOOR_HEADERS = ["X-TokenRelay-Id", "X-TokenRelay-After", "X-TokenRelay-Topic"]
MAX_BODY_BYTES = 256 * 1024


class BodyTooLarge(HTTPException):
    """A body that grew past the limit while it was read (chunked, no Content-Length)."""


class BodyLimit:
    """413 for bodies over the limit: at once from Content-Length, else while reading."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                response = JSONResponse(
                    {"error": f"request body over {self.limit} bytes"}, status_code=413
                )
                await response(scope, receive, send)
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI re-raises HTTPExceptions from body reading; the handler answers.
                    raise BodyTooLarge(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


def create_app(
    settings: Settings,
    *,
    workers: int = 0,
    supervisor_state: Path | None = None,
    own_process: bool = False,
) -> ASGIApp:
    """The gateway. `workers` in-process workers are for tests and embedding: `serve` runs
    workers as processes of their own. `supervisor_state` is where `serve` writes its
    children's state, shown by /healthz and /metrics. `own_process`: the app is all its
    process runs (the command line, the factory), so what start-up made is frozen for the
    garbage collector once the gateway is ready."""
    worker_count = workers
    origins = list(settings.cors_origins)
    # Explicit origins (engine.io's default trusts "Origin equals Host", and Host is forgeable).
    sio = LeanServer(
        async_mode="asgi", cors_allowed_origins=OriginPolicy(settings), serializer=TolerantPacket
    )
    access = Access(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_services(settings, gateway=True, workers=worker_count) as services:
            app.state.services = services
            sse.load_anyio_backend()
            log.info(
                "tokenrelay gateway ready (redis %s, %d in-process workers)",
                services.redis_url.split("@")[-1],
                worker_count,
            )
            if own_process:
                # Modules, routes, clients: ~100k objects that live as long as the process.
                # A full collection scanned them all (20-30 ms, a pause of every viewer).
                gc.collect()
                gc.freeze()
            yield

    api = FastAPI(
        title="tokenrelay",
        version="0.1.0",
        lifespan=lifespan,
        description="Stream LLM answers through Redis Streams, resumable.",
    )
    api.include_router(router)
    api.include_router(openai_router)

    def current() -> Services:
        svc: Services = api.state.services
        return svc

    api.state.access = access
    api.state.supervisor_state = supervisor_state
    api.state.sockets = SocketGateway(sio, current, access)

    error_replies.install(api)

    @api.get("/", include_in_schema=False)
    async def page() -> Any:
        index = STATIC_DIR / "index.html"
        if not index.exists():
            return JSONResponse(
                {"error": "the web page is not built; run `make web`"}, status_code=503
            )
        return FileResponse(index)

    @api.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        svc = current()
        metrics.processes(read_state(supervisor_state))
        body = await metrics.scrape(svc.store, svc.relay)
        return Response(body, media_type=metrics.CONTENT_TYPE_LATEST)

    api.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    # Innermost (added first): inside the body limit and CORS, as the routes it stands in for.
    api.add_middleware(QuickRoutes)
    if origins:
        api.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Authorization", "Last-Event-ID", *FRONT_DOOR_HEADERS],
            # A browser script on an allowed origin reads the id to re-attach a cut stream.
            expose_headers=["X-TokenRelay-Id"],
        )
    api.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    asgi: ASGIApp = socketio.ASGIApp(sio, other_asgi_app=api)
    # Outermost: a forged Host is refused before Socket.IO or FastAPI read anything.
    return SecurityHeaders(HostGuard(asgi, allowed_hosts(settings)))


def from_environment() -> ASGIApp:
    """For process managers that start the app themselves, with settings from the
    environment: `uvicorn --factory tokenrelay.gateway.app:from_environment`."""
    settings = load_settings()
    logs.configure("info", json=settings.log_json)
    return create_app(settings, own_process=True)
