"""Commands of concurrent callers sent together: one batch, one round trip, however many.

A burst of asks each sending its own command waited for one of the pool's few connections,
round trip after round trip, while the event loop was busy with everything else: 100 asks
at once waited 33 ms (p50, 80 p90) for the reply to their first command. Here a command
waits at most for the batch in flight: whatever is issued meanwhile goes in the next one.

The batch is packed by hand and sent on a `Lane` of its own when the process has one (the
gateway's and the worker's, opened by `open_services`), else on a pool connection. With
redis-py's pipeline (its packing, the pool's hand-out and return, its response callbacks) an
ask's script call cost its process 275 us of CPU alone and 58 us in a burst of 100; packed by
hand on a pool connection 216 and 40; on a lane 166 and 24 (`python -m bench.batchcost`).
Single node only (a cluster client's pipeline splits by node, and its scripts by slot).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from tokenrelay.connection import Lane, call_packed, pack

Parse = Callable[[Any], Any]  # a command's reply as its caller wants it
Arg = str | int


def as_dict(reply: Any) -> Any:
    """HGETALL's reply (a flat list of names and values under RESP2) as a dict."""
    if isinstance(reply, list):
        return dict(zip(reply[::2], reply[1::2], strict=True))
    return reply


class AutoPipeline:
    """`command(*args)`: the reply of that one command (an error reply raised), sent with the
    commands of the moment. One batch in flight at a time, on `lane`, else on one of the
    client's pool connections. A batch whose connection fails is sent again as the client's
    own commands are (its Retry), as redis-py's pipeline was: a command whose reply was
    lost with its connection may have run, and then runs twice (reads, and an answer's
    start and end, are checked in their scripts; an ask queued twice is answered by
    whichever delivery began last, the other one fenced)."""

    def __init__(self, redis: Redis, lane: Lane | None = None) -> None:
        self._redis = redis
        self._lane = lane
        self._waiting: list[tuple[bytes, Parse | None, asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.batches = 0  # round trips made: a test's view of how commands were grouped

    async def command(self, *args: Arg, parse: Parse | None = None) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((pack(args), parse, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_all(), name="tokenrelay-autopipeline")
        return await future

    async def script(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """`script`'s reply, run with the batch; run alone (which loads it again) when Redis
        lost its scripts (a restart): EVALSHA reports NOSCRIPT, it does not load them."""
        try:
            return await self.command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await script(keys, args)

    async def _send_all(self) -> None:
        batch: list[tuple[bytes, Parse | None, asyncio.Future[Any]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                await self._send(batch)
                batch = []
        finally:
            self._sender = None
            # Cancelled (the loop is closing): nobody is left waiting for ever.
            for *_, future in [*batch, *self._waiting]:
                future.cancel()
            self._waiting = []

    async def _send(self, batch: list[tuple[bytes, Parse | None, asyncio.Future[Any]]]) -> None:
        payload = b"".join(packed for packed, _, _ in batch)
        self.batches += 1
        try:
            replies = await call_packed(self._redis, payload, len(batch), self._lane)
        except Exception as e:  # the connection failed: every command of the batch did
            for *_, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, parse, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply if parse is None else parse(reply))
