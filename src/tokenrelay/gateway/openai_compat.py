"""The OpenAI front door: `POST /v1/chat/completions`, answered through the relay.

Any OpenAI SDK client asks here and gets a tokenrelay answer: the last user message is
the question, the topic comes from a `topic` body field (SDK: `extra_body`) or the
`X-TokenRelay-Topic` header, else "General"; other messages and sampling options are not
used (tokenrelay's prompt and the worker's model answer). The question id comes back in
`X-TokenRelay-Id` and each streamed chunk carries its entry ID (`tokenrelay_entry_id`,
also the SSE `id:`), so a dropped stream re-attaches: the same request with headers
`X-TokenRelay-Id` (+ `X-TokenRelay-After: <entry id>`), or
`GET /v1/chat/completions/{id}/stream?after=<entry id>`. Nothing is asked twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from tokenrelay.errors import (
    AnswerTimeout,
    CallerFull,
    Conflict,
    InvalidInput,
    NotFound,
    Overloaded,
)
from tokenrelay.gateway import answers, sse
from tokenrelay.gateway.access import Caller, RateLimited, Unauthorized, bearer
from tokenrelay.gateway.conversation import SAMPLING, TOOLS, messages_input, sampling_options
from tokenrelay.gateway.http import SSE_PING_S, access, services
from tokenrelay.gateway.inputs import (
    NotJson,
    ask_input,
    idempotency_key,
    question_id,
    require_json,
)
from tokenrelay.gateway.sse import EventStream
from tokenrelay.wire import Context, Entry, EntryType, QuestionRecord, parse_cursor

router = APIRouter(prefix="/v1", tags=["openai"])
ID_HEADER = "X-TokenRelay-Id"
AFTER_HEADER = "X-TokenRelay-After"
TOPIC_HEADER = "X-TokenRelay-Topic"
DEFAULT_TOPIC = "General"


class OpenAIError(Exception):
    """An error answered in OpenAI's shape; `retry` feeds the SDK's `x-should-retry`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        *,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.retry_after_s = retry_after_s

    def response(self, qid: str = "") -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "model_error"
        headers = {"x-should-retry": "true" if self.retry_after_s is not None else "false"}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(int(self.retry_after_s))
        if qid:
            headers[ID_HEADER] = qid
        body = {"error": {"message": self.message, "type": kind, "param": None, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def _caller(request: Request) -> Caller:
    address = request.client.host if request.client is not None else "unknown"
    try:
        return access(request).caller(bearer(request.headers.get("authorization")), address)
    except Unauthorized as e:
        raise OpenAIError(401, str(e), "invalid_api_key") from e


# What the front door takes besides the sampling options: anything else is refused with a
# 400 naming it, never dropped silently.
_ACCEPTED = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "topic",
    "n",
    "user",
    *SAMPLING,
    *TOOLS,
}


def _context(body: dict[str, Any], budget_chars: int) -> tuple[str, Context]:
    """(the question, its context): the caller's messages before it and its options."""
    unknown = sorted(set(body) - _ACCEPTED)
    if unknown:
        raise InvalidInput(
            f"unsupported parameter {unknown[0]!r}: tokenrelay passes messages, sampling "
            f"options ({', '.join(SAMPLING)}) and tools ({', '.join(TOOLS)}) to the model"
        )
    if body.get("n", 1) != 1:
        raise InvalidInput("'n' must be 1: tokenrelay streams one answer per question")
    history, question = messages_input(body.get("messages"), budget_chars)
    return question, Context(history=history, options=sampling_options(body))


async def _attach(
    request: Request, body: dict[str, Any], who: Caller
) -> tuple[QuestionRecord, str]:
    """(record, cursor): the question named by X-TokenRelay-Id, or a new one."""
    svc = services(request)
    if (named := request.headers.get(ID_HEADER)) is not None:
        cursor = parse_cursor(request.headers.get(AFTER_HEADER))
        return await answers.attach(svc, access(request), who, question_id(named), cursor)
    topic = body.get("topic") or request.headers.get(TOPIC_HEADER) or DEFAULT_TOPIC
    question, context = _context(body, svc.settings.context_chars)
    asked = ask_input({"topic": topic, "question": question}, svc.settings)
    key = idempotency_key(request.headers.get("idempotency-key"))
    try:
        record = await answers.ask(svc, access(request), who, asked, key, context)
    except RateLimited as e:
        raise OpenAIError(429, str(e), "rate_limit_exceeded", retry_after_s=e.retry_after_s) from e
    except Overloaded as e:
        status, code = (429, "rate_limit_exceeded") if isinstance(e, CallerFull) else (503, None)
        raise OpenAIError(status, str(e), code, retry_after_s=e.retry_after_s) from e
    except Conflict as e:
        raise OpenAIError(409, str(e), "idempotency_key_reused") from e
    return record, "0-0"


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    """OpenAI's chat completions, streamed (`stream: true`) or whole."""
    qid = ""
    try:
        who = _caller(request)
        require_json(request.headers.get("content-type"))
        try:
            # orjson: nesting past 1,024 levels and lone surrogates are decode errors here,
            # where the standard library would recurse out (500) or let them through.
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as e:
            raise InvalidInput(f"the body must be a JSON object ({e})") from e
        if not isinstance(body, dict) or not isinstance(body.get("stream", False), bool):
            raise InvalidInput("the body must be a JSON object; 'stream' true or false")
        record, cursor = await _attach(request, body, who)
        qid = record.id
        if body.get("stream"):
            options = body.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            return _stream(request, record, cursor, usage=usage)
        return await _whole(request, record)
    except NotJson as e:
        return OpenAIError(415, str(e), "unsupported_media_type").response(qid)
    except InvalidInput as e:
        return OpenAIError(400, str(e)).response(qid)
    except NotFound as e:
        return OpenAIError(404, str(e), "not_found").response(qid)
    except OpenAIError as e:
        return e.response(qid)


@router.get("/chat/completions/{qid}/stream")
async def reattach(
    qid: str,
    request: Request,
    after: Annotated[str | None, Query(description="resume after this entry ID")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """Re-attach to a streamed completion: the chunks after `after` (or `Last-Event-ID`)."""
    try:
        cursor = parse_cursor(last_event_id if last_event_id is not None else after)
        record, cursor = await answers.attach(
            services(request), access(request), _caller(request), question_id(qid), cursor
        )
    except InvalidInput as e:
        return OpenAIError(400, str(e)).response()
    except NotFound as e:
        return OpenAIError(404, str(e), "not_found").response()
    except OpenAIError as e:
        return e.response()
    return _stream(request, record, cursor, usage=False)


def _head(record: QuestionRecord, model: str) -> dict[str, Any]:
    created = record.created_ms // 1000
    return {"id": f"chatcmpl-{record.id}", "created": created, "model": model or "tokenrelay"}


def _failure(entry: Entry) -> OpenAIError:
    if entry.type is EntryType.CANCELLED:
        return OpenAIError(409, "the answer was cancelled", "cancelled")
    kind = str(entry.meta.get("kind") or "model_error")
    return OpenAIError(502, entry.text or "the model failed to answer", kind)


def _stream(request: Request, record: QuestionRecord, cursor: str, *, usage: bool) -> Response:
    head = {**_head(record, record.model), "object": "chat.completion.chunk"}

    async def events() -> AsyncIterator[bytes]:
        # Every entry ready goes out in one write (one send, one socket write per batch).
        async for batch in answers.follow_batches(services(request), record, cursor):
            out: list[bytes] = []
            for entry in batch:
                if not _chunk_events(entry, head, usage, out):
                    yield b"".join(out)
                    return
            yield b"".join(out)

    return EventStream(events(), ping_s=SSE_PING_S, headers={ID_HEADER: record.id})


def _chunk(
    head: dict[str, Any], entry: Entry, delta: dict[str, Any], finish: str | None = None
) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    data = {**head, "choices": [choice], "tokenrelay_entry_id": entry.entry_id}
    return sse.event(orjson.dumps(data), event_id=entry.entry_id)


def _chunk_events(entry: Entry, head: dict[str, Any], usage: bool, out: list[bytes]) -> bool:
    """Append the entry's events in OpenAI's shape to `out`; False when the stream ends."""
    if entry.type is EntryType.START:
        head["model"] = str(entry.meta.get("model") or head["model"])
        out.append(_chunk(head, entry, {"role": "assistant", "content": ""}))
    elif entry.type is EntryType.CHUNK:
        out.append(_chunk(head, entry, {"content": entry.text}))
    elif entry.type is EntryType.REASONING:
        out.append(_chunk(head, entry, {"reasoning_content": entry.text}))
    elif entry.type is EntryType.TOOL_CALL:
        out.append(_chunk(head, entry, {"tool_calls": [_tool_call_delta(entry)]}))
    elif entry.type is EntryType.RESTART:
        # Text already sent cannot be taken back in this protocol: end, say how to go on.
        message = (
            "a worker restarted this answer with a different text; re-attach with "
            f"{AFTER_HEADER}: {entry.entry_id} to read the new one"
        )
        out.append(_error_event(OpenAIError(502, message, "restart"), entry))
        return False
    elif entry.type is EntryType.END:
        out.append(_chunk(head, entry, {}, str(entry.meta.get("finish_reason") or "stop")))
        if usage:
            figures = {**head, "choices": [], "usage": _usage(entry)}
            out.append(sse.event(orjson.dumps(figures), event_id=entry.entry_id))
        out.append(sse.event(b"[DONE]"))
    elif entry.terminal:
        out.append(_error_event(_failure(entry), entry))
    return True


def _tool_call_delta(entry: Entry) -> dict[str, Any]:
    """A tool call piece as OpenAI streams it: id, type and name only on a call's first."""
    function: dict[str, str] = {"arguments": entry.text}
    delta: dict[str, Any] = {"index": int(entry.meta.get("index", 0)), "function": function}
    if entry.meta.get("id"):
        delta["id"], delta["type"] = str(entry.meta["id"]), "function"
    if entry.meta.get("name"):
        function["name"] = str(entry.meta["name"])
    return delta


def _tool_calls(entries: list[Entry]) -> list[dict[str, Any]]:
    """A whole answer's tool calls, their pieces joined by index."""
    calls: dict[int, dict[str, Any]] = {}
    for entry in entries:
        if entry.type is not EntryType.TOOL_CALL:
            continue
        index = int(entry.meta.get("index", 0))
        call = calls.setdefault(
            index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        call["id"] = call["id"] or str(entry.meta.get("id") or "")
        call["function"]["name"] += str(entry.meta.get("name") or "")
        call["function"]["arguments"] += entry.text
    return [calls[i] for i in sorted(calls)]


def _error_event(error: OpenAIError, entry: Entry) -> bytes:
    body = {"message": error.message, "type": "model_error", "param": None, "code": error.code}
    return sse.event(orjson.dumps({"error": body}), event_id=entry.entry_id)


def _usage(end: Entry) -> dict[str, int]:
    prompt, completion = (
        int(end.meta.get("prompt_tokens", 0)),
        int(end.meta.get("completion_tokens", 0)),
    )
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _whole(request: Request, record: QuestionRecord) -> Response:
    svc = services(request)
    try:
        whole = await answers.whole(svc, record.id)
    except AnswerTimeout:
        late = "the answer did not finish in time; it goes on: re-attach with stream: true"
        return OpenAIError(504, late, "timeout").response(record.id)
    if not whole.ok:
        return _failure(whole.last).response(record.id)
    done = await svc.store.record(record.id)
    message: dict[str, Any] = {"role": "assistant", "content": whole.text, "refusal": None}
    thoughts = "".join(e.text for e in whole.entries if e.type is EntryType.REASONING)
    if thoughts:
        message["reasoning_content"] = thoughts
    if calls := _tool_calls(list(whole.entries)):
        message["tool_calls"] = calls
    reason = str(whole.last.meta.get("finish_reason") or "stop")
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
    completion = {
        **_head(done, done.model),
        "object": "chat.completion",
        "choices": [choice],
        "usage": _usage(whole.last),
    }
    return JSONResponse(completion, headers={ID_HEADER: record.id})
