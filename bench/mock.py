"""The benchmark's model server: `tokenrelay.testing`'s mock model, plus each chunk's send time.

The mock stamps each content chunk with `tokenrelay_sent_ns`. A direct client reads the
stamp from the chunk itself; tokenrelay's viewers never see it (the worker passes on the
text only, as it must), so this server also keeps the stamps of each question, in order,
and hands them to the clients at the end: chunk *i* a viewer receives is chunk *i* the
model sent. Questions are told apart by the nonce the client put in them.

Run it alone with `python -m bench.mock --port 8100`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
from collections import defaultdict
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from bench.loop import run
from tokenrelay.testing.mockllm import MockBackend, MockLLM

NONCE = re.compile(r"bench-([0-9a-f]{8,32})")
_STAMP = b'"tokenrelay_sent_ns":'


def nonce_of(text: str) -> str | None:
    match = NONCE.search(text)
    return match[1] if match else None


def stamp_of(chunk: bytes) -> int | None:
    """The `tokenrelay_sent_ns` of one SSE event from the mock, without parsing all of it."""
    at = chunk.find(_STAMP)
    if at < 0:
        return None
    start = at + len(_STAMP)
    end = start
    while end < len(chunk) and 48 <= chunk[end] <= 57:
        end += 1
    return int(chunk[start:end])


def _question_of(body: Any) -> str:
    messages = body.get("messages") if isinstance(body, dict) else None
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


class StampingBackend(MockBackend):
    """The mock, keeping the send times of the content chunks of every `bench-<nonce>` question."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: defaultdict[str, list[int]] = defaultdict(list)
        self.app.router.routes.extend(
            [
                Route("/bench/stamps", self.stamps_for, methods=["POST"]),
                Route("/bench/reset", self.reset, methods=["POST"]),
            ]
        )

    async def chat_completions(self, request: Request) -> Response:
        response = await super().chat_completions(request)
        if isinstance(response, StreamingResponse):
            try:
                nonce = nonce_of(_question_of(await request.json()))
            except ValueError:
                nonce = None
            if nonce is not None:
                response.body_iterator = self._tap(nonce, response.body_iterator)
        return response

    async def _tap(self, nonce: str, body: AsyncIterable[Any]) -> AsyncIterator[Any]:
        stamps = self.stamps[nonce]
        async for chunk in body:
            if isinstance(chunk, bytes):
                sent_ns = stamp_of(chunk)
                if sent_ns is not None:
                    stamps.append(sent_ns)
            yield chunk

    async def stamps_for(self, request: Request) -> Response:
        """`{"nonces": [...]}` -> `{nonce: [sent_ns, ...]}`; `{"count": true}` -> total chunks."""
        body = await request.json()
        if body.get("count"):
            total = sum(len(s) for s in self.stamps.values())
            body = {"chunks": total, "answers": len(self.stamps)}
            return Response(orjson.dumps(body), media_type="application/json")
        found = {n: self.stamps.get(n, []) for n in body.get("nonces", [])}
        return Response(orjson.dumps(found), media_type="application/json")

    async def reset(self, request: Request) -> Response:
        self.stamps.clear()
        self.requests.clear()
        return Response(b"{}", media_type="application/json")


async def serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    mock = MockLLM(host, port)
    mock.backend = StampingBackend()
    async with mock:
        print(f"mock model at {mock.base_url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the benchmark's stamping mock model server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
