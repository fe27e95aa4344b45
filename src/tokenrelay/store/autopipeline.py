"""Commands of concurrent callers sent together: one pipeline, one round trip, however many.

A burst of asks each sending its own command waited for one of the pool's few connections,
round trip after round trip, while the event loop was busy with everything else: 100 asks
at once waited 33 ms (p50, 80 p90) for the reply to their first command. Here a command
waits at most for the batch in flight: whatever is issued meanwhile goes in the next one.
Single node only (a cluster client's pipeline splits by node, and its scripts by slot).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

Queue = Callable[[Pipeline], Awaitable[object]]  # adds one command to a pipeline


class AutoPipeline:
    """`call(queue)`: the reply of the one command `queue` adds (an error reply raised).
    One batch in flight at a time, on one of the client's pool connections."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._waiting: list[tuple[Queue, asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def call(self, queue: Queue) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((queue, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_all(), name="tokenrelay-autopipeline")
        return await future

    async def script(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """`script`'s reply, run with the batch; run alone (which loads it again) when Redis
        lost its scripts (a restart): the batch's pipeline reports NOSCRIPT, it does not
        load them."""

        async def queue(pipe: Pipeline) -> None:
            await script(keys, args, client=pipe)

        try:
            return await self.call(queue)
        except NoScriptError:
            return await script(keys, args)

    async def _send_all(self) -> None:
        batch: list[tuple[Queue, asyncio.Future[Any]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                await self._send(batch)
                batch = []
        finally:
            self._sender = None
            # Cancelled (the loop is closing): nobody is left waiting for ever.
            for _, future in [*batch, *self._waiting]:
                future.cancel()
            self._waiting = []

    async def _send(self, batch: list[tuple[Queue, asyncio.Future[Any]]]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for queue, _ in batch:
                    await queue(pipe)
                replies = await pipe.execute(raise_on_error=False)
        except Exception as e:  # the connection failed: every command of the batch did
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)
