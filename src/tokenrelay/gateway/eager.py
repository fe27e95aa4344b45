"""A write begun in the caller's own turn of the loop, from a callback as well as a task.

A viewer's write is a coroutine (an ASGI `send` through the middleware, engine.io's
websocket wrapper) that finishes at once while the client reads: nothing in it waits. The
relay writes a live viewer's entries in the doorbell's read callback (relay.Subscription),
where no task runs: `eagerly` steps the coroutine there, and only when it does wait (the
client's flow control holds it) hands the rest to a task. Python 3.12's eager tasks do
the same; this is 3.11.
"""

from __future__ import annotations

import asyncio
import functools
import types
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any


def eagerly(coro: Awaitable[None]) -> asyncio.Future[None] | None:
    """Run `coro` now as far as it goes: None when it finished; else its rest runs in a
    task, and the future returned is done once that task is, however it ended (what it
    raised is dropped: a writer learns of a client gone from its disconnect). What `coro`
    raises before its first wait, this raises. (An awaitable that is not a coroutine cannot
    be stepped: all of it runs in the task.)"""
    if not isinstance(coro, Coroutine):
        rest: asyncio.Future[None] = asyncio.ensure_future(coro)
    else:
        try:
            held = coro.send(None)
        except StopIteration:
            return None
        rest = asyncio.ensure_future(_go_on(coro, held))
    ended = asyncio.get_running_loop().create_future()
    rest.add_done_callback(functools.partial(_ended, ended))
    return ended


def _ended(ended: asyncio.Future[None], rest: asyncio.Future[None]) -> None:
    if not rest.cancelled():
        rest.exception()  # retrieved, so that asyncio does not log it as never retrieved
    ended.set_result(None)


@types.coroutine
def _go_on(coro: Coroutine[Any, Any, None], held: Any) -> Generator[Any, Any, None]:
    """The rest of `coro`, a coroutine already started that yielded `held` (what it waits
    for): run as a task's own, each wait passed on to the task and each wake-up (or the
    task's cancel) back to the coroutine."""
    while True:
        try:
            sent = yield held
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # the task cancelled: the coroutine sees it where it waits
            try:
                held = coro.throw(e)
            except StopIteration:
                return
        else:
            try:
                held = coro.send(sent)
            except StopIteration:
                return
