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
import types
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any


def eagerly(coro: Awaitable[None]) -> asyncio.Future[None] | None:
    """Run `coro` now as far as it goes: None when it finished, else the task that runs the
    rest. What it raises before its first wait, this raises. (An awaitable that is not a
    coroutine cannot be stepped: it is awaited in a task.)"""
    if not isinstance(coro, Coroutine):
        return asyncio.ensure_future(coro)
    try:
        held = coro.send(None)
    except StopIteration:
        return None
    return asyncio.ensure_future(_go_on(coro, held))


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
