"""Every error a route can raise, answered the same way: `{"error": message}` with its status
(and `Retry-After` / `WWW-Authenticate` where they apply). FastAPI's own errors too."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tokenrelay.errors import (
    AnswerTimeout,
    CallerFull,
    Conflict,
    InvalidInput,
    NotFound,
    Overloaded,
    StoreError,
)
from tokenrelay.gateway.access import RateLimited, Unauthorized
from tokenrelay.gateway.inputs import NotJson

# Most specific first: NotJson is an InvalidInput.
_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (NotJson, 415),
    (InvalidInput, 422),
    (NotFound, 404),
    (Conflict, 409),
    (AnswerTimeout, 504),
)
HANDLED: tuple[type[Exception], ...] = (
    *(kind for kind, _ in _STATUS),
    Unauthorized,
    RateLimited,
    Overloaded,
    StoreError,
    HTTPException,
    RequestValidationError,
)


def _first_problem(exc: RequestValidationError) -> str:
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        return f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg"))
    return "invalid request"


def describe(exc: Exception) -> tuple[int, str, dict[str, str]]:
    """(status, message, headers) for an error a route raised."""
    if isinstance(exc, HTTPException):
        # FastAPI's own (unknown route, bad method, unreadable or oversized body).
        return exc.status_code, str(exc.detail), dict(exc.headers or {})
    if isinstance(exc, RequestValidationError):
        return 422, _first_problem(exc), {}
    if isinstance(exc, Unauthorized):
        return 401, str(exc), {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, RateLimited | Overloaded):
        # A full backlog: 503; this caller over its rate or its share: 429. Never dropped.
        full = isinstance(exc, Overloaded) and not isinstance(exc, CallerFull)
        return (503 if full else 429), str(exc), {"Retry-After": str(int(exc.retry_after_s))}
    if isinstance(exc, StoreError):
        return 503, f"storage unavailable: {exc}", {}
    status = next((s for kind, s in _STATUS if isinstance(exc, kind)), 500)
    return status, str(exc), {}


def reply(exc: Exception) -> JSONResponse:
    status, message, headers = describe(exc)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _reply(_: Request, exc: Exception) -> JSONResponse:
    return reply(exc)


def install(api: FastAPI) -> None:
    for kind in HANDLED:
        api.add_exception_handler(kind, _reply)
