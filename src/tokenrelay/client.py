"""`tokenrelay.Client`: ask, watch, cancel and list answers over HTTP, resuming by itself.

    async with Client("http://127.0.0.1:8000") as client:
        answer = await client.ask("What is a consumer group?")
        async for event in answer:          # start, chunk..., then end / error / cancelled
            print(event.text, end="")

A dropped connection is not an error: the answer re-attaches with the last entry ID it
saw (SSE `Last-Event-ID`) after a growing, jittered pause, so no chunk is lost and none
repeats. Only a server gone for `reconnect_attempts` tries in a row ends it.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any, Literal, overload

import httpx
import orjson

from tokenrelay.errors import TokenRelayError
from tokenrelay.providers.retry import retry_after_s

DEFAULT_SERVER = "http://127.0.0.1:8000"
TERMINAL_TYPES = frozenset({"end", "error", "cancelled"})
# The gateway pings SSE streams every 15 s: three missed pings mean the connection is dead.
SSE_READ_TIMEOUT_S = 45.0


class ClientError(TokenRelayError):
    """The client could not do what was asked; the message says why."""


class ServerUnreachable(ClientError, ConnectionError):
    """No answer from the gateway (refused, timed out, or gone for too many retries)."""


class RequestRejected(ClientError, ValueError):
    """The gateway refused the request (4xx) or failed it (5xx); `status` says which."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AnswerFailed(ClientError, RuntimeError):
    """The answer ended in `error` (the model failed) or `cancelled`; `kind` says how."""

    def __init__(self, question_id: str, kind: str, message: str) -> None:
        super().__init__(message)
        self.question_id = question_id
        self.kind = kind


@dataclass(frozen=True, slots=True)
class AnswerEvent:
    """One entry of an answer. `data` is the whole event (see docs/api.md)."""

    question_id: str
    entry_id: str  # the resume cursor
    type: str  # start, chunk, end, error, cancelled, restart
    text: str
    data: Mapping[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


@dataclass(frozen=True, slots=True)
class Answer:
    """A finished answer: its whole text and the terminal event's figures."""

    id: str
    text: str
    end: AnswerEvent


@dataclass(frozen=True, slots=True)
class Question:
    """A question record, as `history()` lists it."""

    id: str
    topic: str
    question: str
    status: str  # queued, streaming, done, failed, cancelled
    created_ms: int
    started_ms: int | None = None
    ended_ms: int | None = None
    model: str | None = None
    provider: str | None = None
    first_entry_id: str | None = None
    last_entry_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: int = 0
    ttft_ms: int | None = None
    error: str | None = None
    follows: str | None = None  # in a thread: the question this one follows
    thread: str | None = None  # in a thread: its first question's id

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Question:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class AnswerStream:
    """An answer's events in order, once each, until a terminal one; iterate it once."""

    def __init__(
        self,
        client: Client,
        question_id: str,
        after: str | None = None,
        opened: httpx.Response | None = None,
    ) -> None:
        """`opened`: the answer's event stream already open (an ask that streams), read
        before any re-attach."""
        self.id = question_id
        self.last_entry_id = after or ""  # where a re-attach resumes
        self.reconnects = 0
        self._client = client
        self._opened = opened

    def __aiter__(self) -> AsyncIterator[AnswerEvent]:
        return self._events()

    async def aclose(self) -> None:
        """Close the stream the ask opened, when it is not read (reading to the end, or
        leaving the loop, closes it too)."""
        opened, self._opened = self._opened, None
        if opened is not None:
            await opened.aclose()

    async def _events(self) -> AsyncIterator[AnswerEvent]:
        client, failures = self._client, 0
        while True:
            opened, self._opened = self._opened, None
            try:
                events = (
                    client._sse(self.id, self.last_entry_id)
                    if opened is None
                    else _read_events(opened, self.id)
                )
                async for event in events:
                    failures = 0
                    self.last_entry_id = event.entry_id
                    yield event
                    if event.terminal:
                        return
                problem = "the stream closed before the answer ended"
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            except RequestRejected as e:
                if e.status < 500:
                    raise
                problem = str(e)
            finally:
                if opened is not None:
                    await opened.aclose()
            failures += 1
            if failures > client.reconnect_attempts:
                raise ServerUnreachable(
                    f"lost the answer {self.id} from {client.server} ({problem}) and could not "
                    f"re-attach in {client.reconnect_attempts} tries; resume with "
                    f"watch({self.id!r}, after={self.last_entry_id!r})"
                )
            await asyncio.sleep(client.backoff_s(failures))
            self.reconnects += 1

    async def chunks(self) -> AsyncIterator[str]:
        """Just the text as it arrives; raises AnswerFailed if the answer does not end well.

        A `restart` (a worker died and its replacement wrote a different answer) cannot be
        taken back from plain text: use the events to handle it.
        """
        async for event in self:
            if event.type == "chunk":
                yield event.text
            elif event.type in ("error", "cancelled"):
                raise _failure(event)

    async def collect(self) -> Answer:
        """Wait for the whole answer; raises AnswerFailed on `error` or `cancelled`."""
        parts: list[str] = []
        async for event in self:
            if event.type == "chunk":
                parts.append(event.text)
            elif event.type == "restart":
                parts.clear()
            elif event.type == "end":
                return Answer(self.id, "".join(parts), event)
            elif event.terminal:
                raise _failure(event)
        raise AssertionError("unreachable: the event stream only ends at a terminal event")


def _failure(event: AnswerEvent) -> AnswerFailed:
    if event.type == "cancelled":
        return AnswerFailed(event.question_id, "cancelled", "the answer was cancelled")
    kind = str(event.data.get("kind") or "error")
    return AnswerFailed(event.question_id, kind, event.text or "the model failed to answer")


class Client:
    """An async client for one tokenrelay gateway (httpx underneath)."""

    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        *,
        timeout_s: float = 30.0,
        reconnect_attempts: int = 8,
        max_backoff_s: float = 5.0,
        api_key: str | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        """`api_key`: one of the gateway's TOKENRELAY_API_KEYS, when it sets them."""
        self.server = server.rstrip("/")
        self.reconnect_attempts = reconnect_attempts
        self.max_backoff_s = max_backoff_s
        timeout = httpx.Timeout(timeout_s, read=max(timeout_s, SSE_READ_TIMEOUT_S))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = http or httpx.AsyncClient(
            base_url=self.server, timeout=timeout, headers=headers
        )
        self._owns_http = http is None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    def backoff_s(self, failures: int) -> float:
        # Jittered, so viewers dropped together by one gateway restart do not return together.
        return min(self.max_backoff_s, 0.2 * 2.0 ** (failures - 1)) * random.uniform(0.5, 1.0)

    @overload
    async def ask(
        self,
        question: str,
        *,
        topic: str | None = None,
        stream: Literal[True] = True,
        follows: str | None = None,
        idempotency_key: str | None = None,
    ) -> AnswerStream: ...
    @overload
    async def ask(
        self,
        question: str,
        *,
        topic: str | None = None,
        stream: Literal[False],
        follows: str | None = None,
        idempotency_key: str | None = None,
    ) -> Answer: ...
    async def ask(
        self,
        question: str,
        *,
        topic: str | None = None,
        stream: bool = True,
        follows: str | None = None,
        idempotency_key: str | None = None,
    ) -> AnswerStream | Answer:
        """Ask; returns as soon as the gateway took the question (its `id` is known).

        The answer's events come in the ask's own response (`Accept: text/event-stream`):
        no second request before the first token. Iterate the stream returned (or
        `aclose()` it), since it holds that response open.
        `stream=False` waits for the whole answer instead, over the same resumable stream.
        `follows`: a question id whose answer is done; this one is a follow-up in its
        thread, and the model sees the thread's earlier questions and answers.

        The ask is tried again when the gateway cannot be reached or its reply is lost
        (a restart, a cut connection) and when it says to come back (429, 502, 503, 504,
        after its `Retry-After`), up to `reconnect_attempts` times in a row, always with
        the same `Idempotency-Key`: the gateway makes the question once, however many of
        the tries reach it, and each gets that one question. `idempotency_key` (1-255
        printable ASCII characters) makes that hold across your own retries too; else a
        new key is made for each call.
        """
        body: dict[str, Any] = {"question": question}
        if topic is not None:
            body["topic"] = topic
        if follows is not None:
            body["follows"] = follows
        key = idempotency_key or uuid.uuid4().hex
        answer = await self._ask_streaming(body, key)
        return answer if stream else await answer.collect()

    async def _ask_streaming(self, body: dict[str, Any], key: str) -> AnswerStream:
        headers = {"Accept": "text/event-stream", "Idempotency-Key": key}
        failures = 0
        while True:
            request = self._http.build_request("POST", "/api/questions", json=body, headers=headers)
            wait_s: float | None = None
            try:
                response = await self._http.send(request, stream=True)
            except httpx.TransportError as e:
                problem: ClientError = self._unreachable(e)
            else:
                if response.status_code not in _ASK_AGAIN:
                    return await self._asked(response)
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                wait_s = retry_after_s(response.headers)
                try:
                    self._reply(response)
                    problem = self._not_tokenrelay(response)
                except RequestRejected as e:
                    problem = e
            failures += 1
            if failures > self.reconnect_attempts:
                raise problem
            await asyncio.sleep(
                min(wait_s, self.max_backoff_s) if wait_s is not None else self.backoff_s(failures)
            )

    async def _asked(self, response: httpx.Response) -> AnswerStream:
        """The ask's response: its stream, or the question it names to watch."""
        question_id = response.headers.get("x-question-id")
        if response.status_code == 200 and question_id:
            return AnswerStream(self, question_id, opened=response)
        try:  # an error, or a gateway that answers every ask with JSON (202 {id})
            await response.aread()
        finally:
            await response.aclose()
        reply = self._reply(response)
        if not isinstance(reply.get("id"), str):
            raise self._not_tokenrelay(response)
        return self.watch(reply["id"])

    def watch(self, question_id: str, *, after: str | None = None) -> AnswerStream:
        """Follow an answer from the start, or from just after the entry ID `after`."""
        return AnswerStream(self, question_id, after)

    async def cancel(self, question_id: str) -> bool:
        """Ask the worker to stop; True when the answer was still running and will end
        `cancelled`, False when it had already finished."""
        reply = await self._call("POST", f"/api/questions/{question_id}/cancel")
        return bool(reply.get("cancelling"))

    async def history(self, limit: int = 50) -> list[Question]:
        """Recent questions, newest first."""
        reply = await self._call("GET", "/api/questions", params={"limit": limit})
        return [Question.from_json(q) for q in reply.get("questions", [])]

    async def question(self, question_id: str) -> tuple[Question, str]:
        """A question's record and its answer text so far (read 1 MiB at a time)."""
        path = f"/api/questions/{question_id}"
        reply = await self._call("GET", path)
        record = Question.from_json(reply["question"])
        parts: list[str] = []
        while True:
            for event in reply.get("entries", []):
                if event.get("type") == "restart":
                    parts.clear()  # a worker started the answer over
                elif event.get("type") == "chunk":
                    parts.append(str(event.get("text", "")))
            after = reply.get("next_after")
            if not after:
                return record, "".join(parts)
            reply = await self._call("GET", path, params={"after": after})

    async def _call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        return self._reply(response)

    def _reply(self, response: httpx.Response) -> dict[str, Any]:
        """A read response's JSON object; RequestRejected for an error or anything else."""
        body = _json_or_empty(response.content)
        _check(response, body)
        if not isinstance(body, dict):
            raise self._not_tokenrelay(response)
        return body

    def _not_tokenrelay(self, response: httpx.Response) -> RequestRejected:
        return RequestRejected(
            response.status_code, f"{self.server} did not answer JSON; is it tokenrelay?"
        )

    def _unreachable(self, e: httpx.TransportError) -> ServerUnreachable:
        reason = str(e) or type(e).__name__
        return ServerUnreachable(f"cannot reach tokenrelay at {self.server} ({reason})")

    async def _sse(self, question_id: str, after: str) -> AsyncIterator[AnswerEvent]:
        headers = {"Accept": "text/event-stream"}
        if after:
            headers["Last-Event-ID"] = after
        path = f"/api/questions/{question_id}/events"
        async with self._http.stream("GET", path, headers=headers) as response:
            if response.status_code >= 400:
                await response.aread()
                _check(response, _json_or_empty(response.content))
            async for event in _read_events(response, question_id):
                yield event


async def _read_events(response: httpx.Response, question_id: str) -> AsyncIterator[AnswerEvent]:
    """The answer events of an open `text/event-stream` response."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            event = orjson.loads("\n".join(data))
            data = []
            yield AnswerEvent(
                question_id,
                str(event.get("entry_id", "")),
                str(event.get("type", "")),
                str(event.get("text", "")),
                event,
            )


# What an ask is tried again after: too many asks now, a proxy without its gateway, a full
# queue or Redis unavailable, a proxy's timeout.
_ASK_AGAIN = frozenset({429, 502, 503, 504})


def _json_or_empty(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}


def _check(response: httpx.Response, body: Any) -> None:
    if response.status_code < 400:
        return
    message = body.get("error") if isinstance(body, dict) else None
    if not isinstance(message, str):
        message = f"HTTP {response.status_code} {response.reason_phrase}"
    raise RequestRejected(response.status_code, message)
