"""Engine.IO sockets whose writer waits for its next packets without a task per wait.

engine.io's websocket writer asks `AsyncSocket.poll()` for what to send, and `poll` waits
with `asyncio.wait_for(queue.get(), ...)`: on Python 3.11 that is a new task, a timer
and their teardown for every wake, i.e. for nearly every packet a viewer is sent (py-spy
of the gateway at 100 answers x 20 tokens/s: `wait_for` and `ensure_future` under the
writer). `LeanSocket.poll` is the same contract (the first packet, then every packet
already queued; `[]` for the closing `None`, which stays queued; QueueEmpty when nothing
came for ping_interval + ping_timeout, or when cancelled), waiting in the writer's own
task, and not at all when packets are already queued; the wait's time limit is one timer
per socket, moved forward rather than made anew for each wait.

`LeanSocket.write_now` skips the writer altogether when it is idle: a viewer's entries are
written to the websocket in the turn that has them, from the relay's doorbell callback or
the viewer's own task (`send_now`), not queued for the writer to wake for. `LeanServer`
makes every engine.io socket a LeanSocket before its transport starts, so a client that
opens a websocket straight away gets it too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import socketio
from engineio import exceptions
from engineio.async_socket import AsyncSocket

from tokenrelay.gateway.eager import eagerly


class LeanSocket(AsyncSocket):  # type: ignore[misc]
    # The idle limit (ping interval + timeout) is kept by one timer per socket, re-armed
    # only when it fires: an `asyncio.timeout` per wait made and cancelled a timer for
    # every packet (~7 us of the gateway's CPU each, measured with a queue and a waiter).
    _deadline = 0.0  # when the current wait has lasted too long
    _timer: asyncio.TimerHandle | None = None
    _waiting: asyncio.Task[Any] | None = None  # the writer's task, while poll waits
    _timed_out = False
    _ws: Any = None  # engine.io's websocket wrapper, while the websocket transport runs
    _sending: asyncio.Future[None] | None = None  # while a held direct write goes on

    async def _websocket_handler(self, ws: Any) -> Any:
        self._ws = ws
        try:
            return await super()._websocket_handler(ws)
        finally:
            self._ws = None

    def write_now(self, texts: list[str]) -> bool:
        """Write these encoded Engine.IO packets to the websocket in this turn of the loop, in
        order, when the writer is idle (waiting, nothing queued, no other direct write under
        way); False, writing nothing, when it is not (queue them instead). Callable from a
        callback: the relay writes a live viewer's entries from the doorbell's read itself.

        The websocket's send is a coroutine that finishes at once while the client reads; it
        is run here, not in a task (`eagerly`). A client that stopped reading holds it in the
        websocket's flow control: the rest of the write then goes on in a task, and what
        comes next waits behind it (`_sending`). A websocket that fails is left to
        engine.io's reader, which sees the close."""
        ws = self._ws
        if (
            ws is None
            or self._waiting is None
            or self._sending is not None
            or not self.queue.empty()
            or not self.upgraded
            or self.upgrading
            or self.closed
        ):
            return False
        held = eagerly(_write_all(ws, texts))
        if held is not None:  # what comes next waits for it
            self._sending = held
            held.add_done_callback(self._held_ended)
        return True

    def _held_ended(self, _: asyncio.Future[None]) -> None:
        self._sending = None

    async def send_now(self, texts: list[str]) -> bool:
        """`write_now` from a task: True once written (a client that stopped reading holds
        this in the websocket's flow control, as it would the writer); False, writing
        nothing, when the writer is not idle."""
        if not self.write_now(texts):
            return False
        if self._sending is not None:
            await asyncio.shield(self._sending)
        return True

    async def poll(self) -> list[Any]:
        queue: asyncio.Queue[Any] = self.queue
        if queue.empty():
            first = await self._wait(queue)
        else:
            first = queue.get_nowait()
        queue.task_done()
        if self._sending is not None:  # queued while a direct write is held: after it
            await asyncio.shield(self._sending)
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

    async def _wait(self, queue: asyncio.Queue[Any]) -> Any:
        """The next packet; QueueEmpty when none came within the idle limit, or when the
        writer is cancelled (as engine.io's own poll)."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.server.ping_interval + self.server.ping_timeout
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._check_idle)
        task = self._waiting = asyncio.current_task()
        try:
            return await queue.get()
        except asyncio.CancelledError:
            if self._timed_out and task is not None:
                task.uncancel()  # our own cancel, not the caller's: the task goes on
            raise exceptions.QueueEmpty() from None
        finally:
            self._waiting = None
            self._timed_out = False

    def _check_idle(self) -> None:
        self._timer = None
        waiting = self._waiting
        if waiting is None:  # not waiting now: the next wait arms the timer again
            return
        loop = asyncio.get_running_loop()
        if loop.time() >= self._deadline:
            self._timed_out = True
            waiting.cancel()
        else:
            self._timer = loop.call_at(self._deadline, self._check_idle)


async def _write_all(ws: Any, texts: list[str]) -> None:
    try:
        for text in texts:
            await ws.send(text)
    except Exception:  # the client is gone; engine.io's reader ends the socket
        pass


def make_lean(socket: object) -> None:
    """Turn an engine.io socket into a LeanSocket (only one of exactly that class)."""
    if type(socket) is AsyncSocket:
        socket.__class__ = LeanSocket


class LeanServer(socketio.AsyncServer):  # type: ignore[misc]
    """A Socket.IO server whose engine.io sockets are LeanSockets from their first packet
    (engine.io's connect event comes before a websocket transport starts)."""

    async def _handle_eio_connect(self, eio_sid: str, environ: dict[str, Any]) -> Any:
        make_lean(self.eio.sockets.get(eio_sid))
        return await super()._handle_eio_connect(eio_sid, environ)
