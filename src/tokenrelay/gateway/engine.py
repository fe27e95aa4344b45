"""Engine.IO sockets whose writer waits for its next packets without a task per wait.

engine.io's websocket writer asks `AsyncSocket.poll()` for what to send, and `poll` waits
with `asyncio.wait_for(queue.get(), ...)`: on Python 3.11 that is a new task, a timer
and their teardown for every wake, i.e. for nearly every packet a viewer is sent (py-spy
of the gateway at 100 answers x 20 tokens/s: `wait_for` and `ensure_future` under the
writer). `LeanSocket.poll` is the same contract (the first packet, then every packet
already queued; `[]` for the closing `None`, which stays queued; QueueEmpty when nothing
came for ping_interval + ping_timeout, or when cancelled), waiting in the writer's own
task, and not at all when packets are already queued.
"""

from __future__ import annotations

import asyncio
from typing import Any

from engineio import exceptions
from engineio.async_socket import AsyncSocket


class LeanSocket(AsyncSocket):  # type: ignore[misc]
    async def poll(self) -> list[Any]:
        queue: asyncio.Queue[Any] = self.queue
        try:
            if queue.empty():
                async with asyncio.timeout(self.server.ping_interval + self.server.ping_timeout):
                    first = await queue.get()
            else:
                first = queue.get_nowait()
        except (TimeoutError, asyncio.CancelledError):
            raise exceptions.QueueEmpty() from None
        queue.task_done()
        if first is None:
            return []
        packets = [first]
        while not queue.empty():
            pkt = queue.get_nowait()
            queue.task_done()
            if pkt is None:
                queue.put_nowait(None)  # the writer sends these, then stops at the next poll
                break
            packets.append(pkt)
        return packets


def make_lean(socket: object) -> None:
    """Turn an engine.io socket into a LeanSocket (only one of exactly that class)."""
    if type(socket) is AsyncSocket:
        socket.__class__ = LeanSocket
