"""An OpenAI-compatible model server for tests (yours too) and benchmarks: real HTTP, scripted.

The last user message may carry a directive, built with `directive(...)`, e.g.
`[[mock tokens=50 rate=20 fail=429 fail_times=1 retry_after=0]]`:

- `tokens=N` content chunks (default 30); `rate=R` chunks per second (default unthrottled);
- `text=...` (URL-encoded) exact text to stream, split into word-sized chunks;
- `fail=STATUS` answer an OpenAI-style HTTP error, `fail_times=K` only for the first K
  requests with this question, `retry_after=S` the Retry-After header (429 always sends one);
- `stall_first=S` before the first chunk; `stall_after=N` + `stall=S` pause after N chunks;
- `malformed_after=N` send `data: {not json` after N chunks;
- `cut_after=N` end the response after N chunks, with no finish_reason and no [DONE].

Run alone with `python -m tokenrelay.testing.mockllm --host 127.0.0.1 --port 8100`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import random
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tokenrelay.providers.base import CONTINUE_INSTRUCTION
from tokenrelay.providers.scripted import split_tokens

__all__ = ["MOCK_MODEL", "MockLLM", "Script", "answer_pieces", "answer_text", "directive"]

MOCK_MODEL = "mock-llm"
_DIRECTIVE = re.compile(r"\[\[mock(?P<args>[^\]]*)\]\]")
_WORDS = (
    *("redis", "stream", "entry", "chunk", "token", "answer", "viewer", "gateway", "worker"),
    *("resume", "cursor", "replay", "history", "consumer", "group", "append", "latency"),
    *("buffer", "socket", "event", "model", "prompt", "reply", "cluster", "shard", "record"),
)
_FILLER = {"a", "an", "the", "what", "which", "who", "how", "why", "is", "are", "do", "does", "of"}
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request for model {model}."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided: {key}."),
    403: ("invalid_request_error", "model_not_found", "Project has no access to model {model}."),
    404: ("invalid_request_error", "model_not_found", "The model `{model}` does not exist."),
    422: ("invalid_request_error", None, "Unprocessable request for model {model}."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for {model}."),
    500: ("server_error", None, "The server had an error while processing your request."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


@dataclass(frozen=True, slots=True)
class Script:
    """What one request should do, parsed from its `[[mock ...]]` directive."""

    tokens: int = 30
    rate: float = 0.0
    text: str | None = None
    fail: int | None = None
    fail_times: int | None = None
    retry_after: float | None = None
    stall_first: float = 0.0
    stall_after: int | None = None
    stall: float = 0.0
    malformed_after: int | None = None
    cut_after: int | None = None
    # 1: every generation draws new words, as a sampling model does (two answers differ).
    sample: int = 0
    # Reasoning pieces (`reasoning_content`) streamed before the answer, as reasoning models do.
    reasoning: int = 0
    # Instead of text: a call of this tool, its arguments streamed in pieces.
    tool: str | None = None

    @classmethod
    def parse(cls, message: str) -> Script:
        match = _DIRECTIVE.search(message)
        if match is None:
            return cls()
        values: dict[str, Any] = {}
        for pair in match["args"].split():
            key, sep, raw = pair.partition("=")
            if not sep or key not in _CONVERT:
                raise ValueError(f"bad mock directive {pair!r}; keys: {', '.join(_CONVERT)}")
            values[key] = _CONVERT[key](unquote(raw))
        return cls(**values)


_CONVERT: dict[str, Callable[[str], object]] = {
    "tokens": int,
    "rate": float,
    "text": str,
    "fail": int,
    "fail_times": int,
    "retry_after": float,
    "stall_first": float,
    "stall_after": int,
    "stall": float,
    "malformed_after": int,
    "cut_after": int,
    "sample": int,
    "reasoning": int,
    "tool": str,
}


def directive(**kw: object) -> str:
    """The `[[mock ...]]` string for these keys, e.g. `directive(tokens=5, rate=10)`."""
    unknown = set(kw) - set(_CONVERT)
    if unknown:
        raise ValueError(f"unknown mock directive keys {sorted(unknown)}; keys: {list(_CONVERT)}")
    return "[[mock " + " ".join(f"{k}={quote(str(v), safe='')}" for k, v in kw.items()) + "]]"


def answer_pieces(message: str, script: Script | None = None) -> list[str]:
    """The content chunks the mock streams for this user message."""
    script = script or Script.parse(message)
    if script.text is not None:
        return split_tokens(script.text)
    question = _DIRECTIVE.sub("", message)
    words = [w.strip("?.!,;:'\"") for w in question.split()]
    topic = " ".join([w for w in words if w.lower() not in _FILLER][:3]) or "nothing"
    # Seeded from the question itself, so every process streams the same words for it;
    # a sampling script draws new words every time.
    seed = hashlib.sha256(question.encode()).digest() if not script.sample else None
    rng = random.Random(seed)
    head = split_tokens(f"Answer about {topic}:")
    tail = [" " + rng.choice(_WORDS) for _ in range(max(0, script.tokens - len(head)))]
    return (head + tail)[: script.tokens]


def continued_pieces(message: str, script: Script, partial: str) -> list[str]:
    """What the mock streams when asked to continue `partial`, its own cut-off answer: the
    rest of the same answer when it is deterministic, new words up to the same length when
    it samples (continuing, never starting over)."""
    pieces = answer_pieces(message, script)
    whole = "".join(pieces)
    if whole.startswith(partial):
        return split_tokens(whole[len(partial) :])
    done = len(split_tokens(partial))
    rng = random.Random()
    return [" " + rng.choice(_WORDS) for _ in range(max(0, script.tokens - done))]


def answer_text(message: str) -> str:
    """The whole answer the mock streams for this user message."""
    return "".join(answer_pieces(message))


def _sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _failure(status: int, retry_after_s: float | None, model: str, key: str) -> Response:
    kind, code, text = _ERRORS.get(status, ("server_error", None, "Mock failure {status}."))
    headers = {}
    if retry_after_s is not None or status == 429:
        headers["retry-after"] = f"{retry_after_s or 0:g}"
    # The key is echoed whole, as some servers do, so tests prove clients never repeat it.
    return _error(status, text.format(model=model, key=key, status=status), kind, code, headers)


def _text_of(message: dict[str, Any]) -> str | None:
    content = message.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else None


def _parse_request(body: object) -> tuple[str, list[dict[str, Any]], str, str]:
    """The model, the messages, the question (the last user message's text) and, when the
    request asks to continue a cut-off answer (tokenrelay's continue instruction after an
    assistant turn), that partial answer; or ValueError saying why."""
    if not isinstance(body, dict):
        raise ValueError("The request body must be a JSON object.")
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not isinstance(messages, list):
        raise ValueError("'model' (a string) and 'messages' (a list) are required.")
    messages = [m for m in messages if isinstance(m, dict)]
    partial = ""
    turns = list(messages)
    if (
        len(turns) >= 3
        and _text_of(turns[-1]) == CONTINUE_INSTRUCTION
        and turns[-2].get("role") == "assistant"
    ):
        partial = _text_of(turns[-2]) or ""
        turns = turns[:-2]
    for message in reversed(turns):
        if message.get("role") == "user" and (content := _text_of(message)) is not None:
            return model, messages, content, partial
    raise ValueError("'messages' needs a user message with text content.")


TOOL_ARGUMENTS = '{"query": "XREADGROUP", "limit": 3}'


def _extra_deltas(script: Script) -> list[dict[str, Any]]:
    """The thoughts (`reasoning=N`) and the tool call (`tool=NAME`) a script streams."""
    deltas: list[dict[str, Any]] = [
        {"reasoning_content": f"thought{n} "} for n in range(script.reasoning)
    ]
    if script.tool is not None:
        deltas += [{"tool_calls": [piece]} for piece in _tool_call_pieces(script.tool)]
    return deltas


def _tool_call_pieces(name: str) -> list[dict[str, Any]]:
    """A call of tool `name` as OpenAI streams it: id, type and name first, then the
    arguments (TOOL_ARGUMENTS) in three pieces."""
    third = len(TOOL_ARGUMENTS) // 3
    parts = [TOOL_ARGUMENTS[:third], TOOL_ARGUMENTS[third : 2 * third], TOOL_ARGUMENTS[2 * third :]]
    first = {"index": 0, "id": "call_mock1", "type": "function"}
    pieces = [{**first, "function": {"name": name, "arguments": ""}}]
    pieces += [{"index": 0, "function": {"arguments": part}} for part in parts]
    return pieces


class _StreamOver(Exception):
    """The scripted stream ends here, without its finish (cut, broken, or shutting down)."""


class MockBackend:
    """The app's state: request counts per question, live streams, shutdown."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        # Every request body received, newest last (GET /v1/mock/requests shows them).
        self.received: list[dict[str, Any]] = []
        self.active_streams = 0
        self.closing = asyncio.Event()
        self._ids = itertools.count(1)
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/mock/requests", self.received_requests, methods=["GET"]),
            ]
        )

    async def models(self, request: Request) -> Response:
        model = {"id": MOCK_MODEL, "object": "model", "created": 0, "owned_by": "tokenrelay"}
        return JSONResponse({"object": "list", "data": [model]})

    async def received_requests(self, request: Request) -> Response:
        return JSONResponse(self.received)

    async def chat_completions(self, request: Request) -> Response:
        try:
            body = await request.json()
            model, messages, question, partial = _parse_request(body)
            script = Script.parse(question)
        except ValueError as e:  # also a body that is not JSON at all
            return _error(400, str(e))
        self.received.append(body)
        del self.received[:-1000]
        self.requests[question] += 1
        if script.fail and (
            script.fail_times is None or self.requests[question] <= script.fail_times
        ):
            key = request.headers.get("authorization", "").removeprefix("Bearer ")
            return _failure(script.fail, script.retry_after, model, key)

        if partial:
            pieces = continued_pieces(question, script, partial)
        else:
            pieces = answer_pieces(question, script)
        words = sum(len(str(m.get("content", "")).split()) for m in messages)
        usage = {
            "prompt_tokens": words,
            "completion_tokens": len(pieces),
            "total_tokens": words + len(pieces),
        }
        head = {
            "id": f"chatcmpl-mock{next(self._ids)}",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
        }
        if body.get("stream"):
            options = body.get("stream_options") or {}
            events = self._events(
                pieces, script, head, usage if options.get("include_usage") else None
            )
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"cache-control": "no-cache"}
            )
        message = {"role": "assistant", "content": "".join(pieces)}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        return JSONResponse(
            {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
        )

    async def _pause(self, delay_s: float) -> bool:
        """Sleep unless the server is shutting down; False means stop streaming."""
        if delay_s > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self.closing.wait()
        return not self.closing.is_set()

    async def _events(
        self, pieces: list[str], script: Script, head: dict[str, Any], usage: dict[str, int] | None
    ) -> AsyncIterator[bytes]:
        self.active_streams += 1
        try:
            base = {**head, "object": "chat.completion.chunk"}
            if usage is not None:
                base["usage"] = None

            def chunk(delta: dict[str, Any], finish: str | None = None, **extra: object) -> bytes:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                return _sse({**base, "choices": [choice], **extra})

            if not await self._pause(script.stall_first):
                return
            yield chunk({"role": "assistant", "content": ""})
            for delta in _extra_deltas(script):
                yield chunk(delta)
            if script.tool is not None:  # a tool call instead of text
                yield chunk({}, "tool_calls")
                yield b"data: [DONE]\n\n"
                return
            try:
                async for event in self._text_events(pieces, script, chunk):
                    yield event
            except _StreamOver:
                return
            if usage is not None:
                yield _sse({**base, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"
        finally:
            self.active_streams -= 1

    async def _text_events(
        self, pieces: list[str], script: Script, chunk: Callable[..., bytes]
    ) -> AsyncIterator[bytes]:
        """The answer's text, paced, then its finish; cut, broken or stalled as scripted
        (a cut or broken stream ends the whole response: the caller's usage and [DONE] are
        never reached)."""
        loop = asyncio.get_running_loop()
        start, paused = loop.time(), 0.0
        cut = None if script.cut_after is None else min(script.cut_after, len(pieces))
        bad = None if script.malformed_after is None else min(script.malformed_after, len(pieces))
        for i, piece in enumerate(pieces):
            if i == cut:
                raise _StreamOver
            if i == bad:
                yield b"data: {not json\n\n"
                raise _StreamOver
            if i == script.stall_after and script.stall > 0:
                if not await self._pause(script.stall):
                    raise _StreamOver
                paused += script.stall
            # Pace against the start time, so slow sends never stretch the whole answer.
            delay = start + paused + i / script.rate - loop.time() if script.rate else 0.0
            if not await self._pause(delay):
                raise _StreamOver
            yield chunk({"content": piece}, tokenrelay_sent_ns=time.time_ns())
        if cut == len(pieces):
            raise _StreamOver
        if bad == len(pieces):
            yield b"data: {not json\n\n"
            raise _StreamOver
        yield chunk({}, "stop")


class _EmbeddedServer(uvicorn.Server):
    # The program embedding the mock (pytest, a benchmark) owns SIGINT/SIGTERM, not uvicorn.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class MockLLM:
    """The mock served from the running loop: `async with MockLLM() as mock: mock.base_url`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.backend = MockBackend()
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def active_streams(self) -> int:
        """Streaming responses still being written (closed ones, even early, are gone)."""
        return self.backend.active_streams

    def requests_for(self, question_substring: str) -> int:
        """How many chat requests carried a user message containing this text."""
        return sum(n for q, n in self.backend.requests.items() if question_substring in q)

    async def start(self) -> None:
        sock = socket.create_server((self.host, self.port))  # bound first: port 0 picks one
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.backend.app,
            lifespan="off",
            ws="none",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                sock.close()
                self._task.result()  # raises why it could not start
                raise RuntimeError("the mock model server stopped while starting")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        """End live streams, stop serving, wait for it. Safe to call twice."""
        if self._server is None or self._task is None:
            return
        self.backend.closing.set()
        self._server.should_exit = True
        await self._task
        self._server = self._task = None

    async def __aenter__(self) -> MockLLM:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def _serve_until_signalled(host: str, port: int) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with MockLLM(host, port) as mock:
        print(f"mock model at {mock.base_url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible mock model server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    try:
        import uvloop  # benchmarks drive this process hard; uvicorn[standard] brings it

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve_until_signalled(args.host, args.port))


if __name__ == "__main__":
    main()
