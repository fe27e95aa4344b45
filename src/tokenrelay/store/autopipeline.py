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
import functools
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


Waiting = tuple[bytes, Parse | None, asyncio.Future[Any]]  # a command, packed, and its caller


class AutoPipeline:
    """`command(*args)`: the reply of that one command (an error reply raised), sent with the
    commands of the moment. One batch in flight at a time, on `lane`, else on one of the
    client's pool connections. A batch whose connection fails is sent again as the client's
    own commands are (its Retry), as redis-py's pipeline was: a command whose reply was
    lost with its connection may have run, and then runs again (reads, and an answer's
    start and end, are checked in their scripts; an ask queued twice is answered by
    whichever delivery began last, the other one fenced).

    On an open lane a batch is begun in a callback at the end of the loop's turn that issued
    its first command (the commands of that turn go with it) and its replies are handed out
    in the I/O callback (`Lane.start`): no task a batch, no coroutines between the callers
    and the socket. The pool, a lane still to open, and a batch sent again go through a
    task (`_send_slow`)."""

    def __init__(self, redis: Redis, lane: Lane | None = None) -> None:
        self._redis = redis
        self._lane = lane
        self._waiting: list[Waiting] = []
        self._busy = False  # a batch is due or on its way: what is issued meanwhile waits
        self._slow: set[asyncio.Task[None]] = set()  # (kept from the garbage collector)
        self.batches = 0  # round trips made: a test's view of how commands were grouped

    async def command(self, *args: Arg, parse: Parse | None = None) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((pack(args), parse, future))
        if not self._busy:
            self._busy = True
            loop.call_soon(self._begin)
        return await future

    async def script(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """`script`'s reply, run with the batch; run alone (which loads it again) when Redis
        lost its scripts (a restart): EVALSHA reports NOSCRIPT, it does not load them."""
        try:
            return await self.command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await script(keys, args)

    def _begin(self) -> None:
        """Send what is waiting as one batch, or become idle."""
        batch, self._waiting = self._waiting, []
        if not batch:
            self._busy = False
            return
        self.batches += 1
        lane = self._lane
        sent = None
        if lane is not None and lane.ready:
            sent = lane.start(b"".join(packed for packed, _, _ in batch), len(batch))
        if sent is None:
            self._send_slow(batch)
        else:
            sent.add_done_callback(functools.partial(self._landed, batch))

    def _landed(self, batch: list[Waiting], sent: asyncio.Future[list[Any]]) -> None:
        if sent.cancelled() or sent.exception():  # the connection failed, or LOADING: again
            self._send_slow(batch)
            return
        _hand_out(batch, sent.result())
        self._begin()

    def _send_slow(self, batch: list[Waiting]) -> None:
        task = asyncio.create_task(self._send(batch), name="tokenrelay-autopipeline")
        self._slow.add(task)
        task.add_done_callback(self._slow.discard)

    async def _send(self, batch: list[Waiting]) -> None:
        payload = b"".join(packed for packed, _, _ in batch)
        try:
            replies = await call_packed(self._redis, payload, len(batch), self._lane)
        except Exception as e:  # the connection failed: every command of the batch did
            for *_, future in batch:
                if not future.done():
                    future.set_exception(e)
        except BaseException:  # cancelled (the loop is closing): nobody waits for ever
            for *_, future in [*batch, *self._waiting]:
                future.cancel()
            self._waiting = []
            self._busy = False
            raise
        else:
            _hand_out(batch, replies)
        self._begin()


def _hand_out(batch: list[Waiting], replies: list[Any]) -> None:
    """Each caller its reply: parsed, or the error (the reply's, or its parse's)."""
    for (_, parse, future), reply in zip(batch, replies, strict=True):
        if future.done():  # its caller was cancelled
            continue
        if isinstance(reply, Exception):
            future.set_exception(reply)
            continue
        try:
            future.set_result(reply if parse is None else parse(reply))
        except Exception as e:  # a reply its caller cannot read: its own error, not the batch's
            future.set_exception(e)
