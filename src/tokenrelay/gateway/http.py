"""HTTP: the JSON API, Server-Sent Events, health, and the seed's "Without Stream" route."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from tokenrelay.children import read_state
from tokenrelay.errors import AnswerTimeout
from tokenrelay.gateway import answers, sse
from tokenrelay.gateway.access import Access, Caller
from tokenrelay.gateway.conversation import follow_up
from tokenrelay.gateway.inputs import ask_input, idempotency_key, question_id, require_json
from tokenrelay.gateway.sse import EventStream, WriteNow
from tokenrelay.services import Services
from tokenrelay.store import answer_text
from tokenrelay.wire import Entry, EntryType, QuestionRecord, parse_cursor

router = APIRouter()
SSE_PING_S = sse.PING_S


class AskBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    topic: str = Field(default="Redis", description="what the model is an expert on")
    question: str
    stream: bool = Field(default=True, description="false: wait and return the whole answer")
    follows: str | None = Field(
        default=None,
        description="a question id: ask a follow-up in that thread (the model sees the "
        "thread's earlier questions and answers)",
    )


class SeedAskBody(BaseModel):
    model_config = ConfigDict(strict=True)
    topic: str
    topicQuestion: str  # the seed's field name


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def access(request: Request) -> Access:
    rules: Access = request.app.state.access
    return rules


bearer = HTTPBearer(
    auto_error=False, description="an API key; required when the server sets TOKENRELAY_API_KEYS"
)


async def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> Caller:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hand-off per
    # request for a dictionary lookup (py-spy: threading.Condition wait/notify ~15% of the
    # gateway while 1,000 SSE viewers attached).
    token = credentials.credentials if credentials is not None else None
    address = request.client.host if request.client is not None else "unknown"
    return access(request).caller(token, address)


Who = Annotated[Caller, Depends(caller)]


async def json_body(request: Request) -> None:
    """415 unless the body is declared JSON (a cross-site form or text/plain fetch is not)."""
    require_json(request.headers.get("content-type"))


JSON_ONLY = [Depends(json_body)]


async def attached(
    request: Request, qid: str, who: Caller, cursor: str = "0-0"
) -> tuple[QuestionRecord, str]:
    """The record of `qid` when `who` may see it (else 422 or 404), and the cursor."""
    return await answers.attach(services(request), access(request), who, question_id(qid), cursor)


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="retrying with the same key gets the first ask's question, never a second "
        "answer (24 h; another question with the key: 409)",
    ),
]


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


ASK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "with `Accept: text/event-stream`: the answer's events, as the events "
        "route gives them (the question's id in `X-Question-Id` and `Location`); with "
        "`stream: false`: the whole answer",
        "content": {"text/event-stream": {}},
    }
}


@router.post(
    "/api/questions",
    status_code=202,
    tags=["questions"],
    dependencies=JSON_ONLY,
    responses=ASK_RESPONSES,
)
async def ask(body: AskBody, request: Request, who: Who, key: IdempotencyKey = None) -> Any:
    """Ask a question. `stream: true` answers at once with the id; watch it over SSE or
    Socket.IO, or send `Accept: text/event-stream` to get its events in this response.
    `stream: false` waits and returns the whole answer."""
    return await ask_with(request, who, body.model_dump(), key)


async def ask_with(request: Request, who: Caller, fields: dict[str, Any], key: str | None) -> Any:
    """`ask`'s work, from its body's fields as `AskBody.model_dump()` gives them (also called
    by gateway/quick_routes.py, which takes the plain asks past FastAPI's machinery)."""
    svc = services(request)
    asked = ask_input(fields, svc.settings)
    context = await follow_up(svc, access(request), who, fields["follows"])
    record = await answers.ask(svc, access(request), who, asked, idempotency_key(key), context)
    qid = record.id
    if asked.stream and wants_events(request.headers.get("accept")):
        # Ask and stream in one request: the events from the first, as the events route
        # gives them, without a second round trip (or a second connection) to open it.
        url = f"/api/questions/{qid}"
        return EventStream(
            _event_stream(svc, record, "0-0"),
            headers={"Location": url, "X-Question-Id": qid},
            ping_s=SSE_PING_S,
        )
    if asked.stream:
        return {
            "id": qid,
            "status": record.status.value,
            "events_url": f"/api/questions/{qid}/events",
            "url": f"/api/questions/{qid}",
        }
    try:
        whole = await answers.whole(svc, qid)
    except AnswerTimeout as e:
        return error(504, str(e), id=qid)
    if not whole.ok:
        return _failed(qid, whole.last.type, whole.last.text)
    return JSONResponse(
        {
            "id": qid,
            "status": "done",
            "output": whole.text,
            "question": (await svc.store.record(qid)).public(),
        }
    )


def _failed(qid: str, kind: EntryType, message: str) -> JSONResponse:
    if kind is EntryType.CANCELLED:
        return error(409, "the answer was cancelled", id=qid)
    return error(502, message or "the model failed to answer", id=qid)


@router.post("/askQuestionWithoutStream", tags=["seed"], dependencies=JSON_ONLY)
async def ask_without_stream(
    body: SeedAskBody, request: Request, who: Who, key: IdempotencyKey = None
) -> Any:
    """The seed page's "Without Stream": `{topic, topicQuestion}` in, `{output}` out."""
    svc = services(request)
    asked = ask_input(body.model_dump(), svc.settings, question_field="topicQuestion")
    record = await answers.ask(svc, access(request), who, asked, idempotency_key(key))
    try:
        whole = await answers.whole(svc, record.id)
    except AnswerTimeout as e:
        return error(504, str(e), id=record.id)
    if not whole.ok:
        return _failed(record.id, whole.last.type, whole.last.text)
    return {"output": whole.text}


@router.get("/api/questions", tags=["questions"])
async def history(
    request: Request, who: Who, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> Any:
    """Recent questions, newest first (with API keys: the caller's own)."""
    records = await services(request).store.history(limit, access(request).history_owner(who))
    return {"questions": [r.public() for r in records]}


@router.get("/api/questions/{qid}", tags=["questions"])
async def question(
    qid: str,
    request: Request,
    who: Who,
    after: Annotated[str | None, Query(description="the entries after this entry ID")] = None,
) -> Any:
    """The question record and its answer so far, up to 1 MiB of text per call: past that,
    `next_after` is the entry ID to ask from next (`?after=`), or follow `events_url`."""
    record, cursor = await attached(request, qid, who, parse_cursor(after))
    entries, next_after = await answers.answer_page(services(request).store, record.id, cursor)
    return {
        "question": record.public(),
        "answer": answer_text(entries),
        "entries": [e.event(record.id) for e in entries],
        "next_after": next_after,
        "events_url": f"/api/questions/{record.id}/events",
    }


@router.post("/api/questions/{qid}/cancel", status_code=202, tags=["questions"])
async def cancel(qid: str, request: Request, who: Who) -> Any:
    """Ask the worker to stop this answer; it ends with a `cancelled` entry."""
    record, _ = await attached(request, qid, who)
    record = await services(request).store.request_cancel(record.id)
    return {
        "id": record.id,
        "status": record.status.value,
        "cancelling": record.status.value in ("queued", "streaming"),
    }


@router.get("/api/questions/{qid}/events", tags=["questions"], response_class=EventStream)
async def events(
    qid: str,
    request: Request,
    who: Who,
    after: Annotated[str | None, Query(description="resume after this entry ID")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Any:
    """Server-Sent Events: `id:` is the entry ID, `event:` its type, `data:` the same JSON
    as the Socket.IO `answer` event. Reconnect with `Last-Event-ID` or `?after=`."""
    return await events_for(request, who, qid, after, last_event_id)


async def events_for(
    request: Request, who: Caller, qid: str, after: str | None, last_event_id: str | None
) -> EventStream:
    """`events`' work (also called by gateway/quick_routes.py)."""
    cursor = parse_cursor(last_event_id if last_event_id is not None else after)
    record, cursor = await attached(request, qid, who, cursor)
    return EventStream(_event_stream(services(request), record, cursor), ping_s=SSE_PING_S)


def wants_events(accept: str | None) -> bool:
    """Whether an `Accept` header names `text/event-stream` (with any parameters)."""
    if not accept:
        return False
    for media_range in accept.split(","):
        media_type, *params = media_range.split(";")
        if media_type.strip().lower() != "text/event-stream":
            continue
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    return float(value) > 0  # q=0: "not this one"
                except ValueError:
                    return False
        return True
    return False


def _event_stream(
    svc: Services, record: QuestionRecord, cursor: str
) -> Callable[[WriteNow], AsyncIterator[bytes]]:
    """The answer's SSE events after `cursor`, for an EventStream: every entry ready goes
    out in one write (one send through the middleware and one socket write per batch
    rather than per entry); a live viewer's entries are written from the relay's read
    callback when the response has no other send under way (`EventStream.write_now`)."""
    qid = record.id

    def encode(batch: list[Entry]) -> bytes:
        return b"".join(entry_event(entry, qid) for entry in batch)

    async def events(write_now: WriteNow) -> AsyncIterator[bytes]:
        def direct(batch: list[Entry]) -> bool:
            return write_now(encode(batch))

        async for batch in answers.follow_batches(svc, record, cursor, direct):
            yield encode(batch)

    return events


def entry_event(entry: Entry, qid: str) -> bytes:
    """An entry as its SSE event: `id:` its entry ID, `event:` its type, `data:` its JSON."""
    return sse.event(orjson.dumps(entry.event(qid)), kind=entry.type.value, event_id=entry.entry_id)


@router.get("/healthz", tags=["operations"])
async def healthz(request: Request) -> Any:
    svc = services(request)
    # Bounded: during a failover the cluster client retries for up to 20 s, and a health
    # check that long is no answer at all.
    ok = await svc.store.ping(timeout_s=1.0)
    queued = request.app.state.sockets.queued()
    # Under `serve`: every supervised process (valkey, gateway, workers) with pid, state,
    # restarts and the reason of its last exit.
    processes = read_state(request.app.state.supervisor_state)
    body = {
        "status": "ok" if ok else "redis unavailable",
        "workers": len(svc.workers),
        "worker_processes": sum(
            1 for p in processes if p.get("kind") == "worker" and p.get("state") == "running"
        ),
        "processes": processes,
        "answers_in_progress": sum(w.busy for w in svc.workers),
        "viewers": svc.relay.viewers if svc.relay else 0,
        # Socket.IO packets queued for engine.io's writer (a long-polling client, or behind a
        # write held by a slow one); bounded per socket (SOCKET_QUEUE_MAX). A websocket client
        # that stops reading holds its viewer's own write instead (LeanSocket.write_now).
        "queued_packets": sum(queued),
        "queued_packets_max": max(queued, default=0),
    }
    return JSONResponse(body, status_code=200 if ok else 503)
