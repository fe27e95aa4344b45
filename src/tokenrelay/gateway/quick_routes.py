"""The two requests of every SSE ask, `POST /api/questions` and `GET /api/questions/{id}/events`,
past FastAPI's per-request machinery when the route would take them as they are; every
other request goes on to the FastAPI routes, which answer it as always.

In-process, an ask cost the gateway ~430 us of CPU, two thirds of it routing, dependency
solving and validation around the handler (py-spy); 100 asks at once queue that long on
the event loop, one behind the other, before the last one is queued in Redis, and their
100 event streams after them. Here an ask whose body is a JSON object of `AskBody`'s
fields and types, as strict validation takes it, and any GET of an answer's events go
straight to the routes' own work (`http.ask_with`, `http.events_for`), with the same
caller, the same errors and the same reply. It sits inside the user middleware (body
limit, CORS) like the routes.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenrelay.gateway import error_replies, http

ASK_PATH = "/api/questions"
EVENTS_PATH = re.compile(r"/api/questions/([^/]+)/events")  # the route's `{qid}`: [^/]+
_NOTHING = object()
# AskBody's fields: the types strict validation takes from JSON, and the default.
_FIELDS: dict[str, tuple[tuple[type, ...], object]] = {
    "topic": ((str,), "Redis"),
    "question": ((str,), _NOTHING),
    "stream": ((bool,), True),
    "follows": ((str, type(None)), None),
}


def plain_ask(payload: object) -> dict[str, Any] | None:
    """`AskBody.model_validate(payload).model_dump()` when it takes `payload` without an
    error; None for anything else (FastAPI then says what is wrong)."""
    if type(payload) is not dict:
        return None
    fields: dict[str, Any] = {}
    for name, (kinds, default) in _FIELDS.items():
        value = payload.get(name, default)
        if value is _NOTHING or (name in payload and type(value) not in kinds):
            return None
        fields[name] = value
    if len(payload) > sum(1 for name in _FIELDS if name in payload):
        return None  # a field AskBody forbids
    return fields


def _json(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the body is declared JSON, as `inputs.require_json` checks it."""
    for name, value in headers:
        if name == b"content-type":
            return value.partition(b";")[0].strip().lower() == b"application/json"
    return False


class QuickRoutes:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if method == "POST" and path == ASK_PATH and _json(scope["headers"]):
            await self._ask(scope, receive, send)
            return
        events = EVENTS_PATH.fullmatch(path) if method == "GET" else None
        if events is not None:
            response = await _events(Request(scope, receive), events[1])
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _ask(self, scope: Scope, receive: Receive, send: Send) -> None:
        received: list[Message] = []
        try:
            body = await _read_body(receive, received)
        except error_replies.HANDLED as e:  # a body over the limit (BodyLimit)
            await error_replies.reply(e)(scope, receive, send)
            return
        fields = _fields(body)
        if fields is None:
            await self.app(scope, _replay(received, receive), send)
            return
        response = await _ask(Request(scope, receive), fields)
        await response(scope, receive, send)


async def _read_body(receive: Receive, received: list[Message]) -> bytes | None:
    """The whole body, each message kept in `received`; None when the client left first."""
    chunks = []
    while True:
        message = await receive()
        received.append(message)
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _fields(body: bytes | None) -> dict[str, Any] | None:
    if body is None:
        return None
    try:
        return plain_ask(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None  # FastAPI's own message says where


def _replay(received: list[Message], receive: Receive) -> Receive:
    """`receive` as if nothing had been read from it."""
    pending = list(received)

    async def again() -> Message:
        return pending.pop(0) if pending else await receive()

    return again


async def _ask(request: Request, fields: dict[str, Any]) -> Response:
    """The route's answer: its dependencies (the caller), its work, its reply or error."""
    try:
        who = await http.caller(request, await http.bearer(request))
        result = await http.ask_with(request, who, fields, request.headers.get("idempotency-key"))
    except error_replies.HANDLED as e:
        return error_replies.reply(e)
    if isinstance(result, Response):
        return result
    return JSONResponse(result, status_code=202)


async def _events(request: Request, qid: str) -> Response:
    """The events route's answer: its caller, query and header, its stream or error."""
    try:
        who = await http.caller(request, await http.bearer(request))
        after = request.query_params.get("after")
        return await http.events_for(request, who, qid, after, request.headers.get("last-event-id"))
    except error_replies.HANDLED as e:
        return error_replies.reply(e)
