"""Socket.IO: the seed's `askQuestion`/`chunk` protocol and the richer ask/watch/cancel.

Every watch is a task owned by its socket; a disconnect cancels them all, so no
reader outlives its client. python-socketio queues emits without bound, so a watch
waits while its socket's queue is full: the relay's bounded buffer then overflows and
the watch catches up from Redis once the client reads again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import socketio

from tokenrelay import metrics
from tokenrelay.errors import AnswerTimeout, InvalidInput, NotFound, TokenRelayError
from tokenrelay.gateway import answers
from tokenrelay.gateway.access import Access, Caller, Unauthorized, socket_address, socket_token
from tokenrelay.gateway.answers import WholeAnswer
from tokenrelay.gateway.conversation import follow_up
from tokenrelay.gateway.engine import LeanSocket
from tokenrelay.gateway.inputs import AskInput, ask_input, idempotency_key, question_id, watch_input
from tokenrelay.gateway.packets import UNREADABLE
from tokenrelay.relay import Direct
from tokenrelay.services import Services
from tokenrelay.wire import Context, Entry, EntryType, QuestionRecord, dumps

log = logging.getLogger(__name__)

Handler = Callable[[str, Any], Awaitable[Any]]
T = TypeVar("T")

# Packets waiting in engine.io's queue for one socket before its watches pause.
SOCKET_QUEUE_MAX = 64
MAX_WATCHES_PER_SOCKET = 100


class SocketGateway:
    def __init__(
        self, sio: socketio.AsyncServer, services: Callable[[], Services], access: Access
    ) -> None:
        self.sio = sio
        self._services = services
        self._access = access
        self._watches: dict[str, dict[str, asyncio.Task[Any]]] = {}
        self._callers: dict[str, Caller] = {}
        # Watches promised to an ask still in flight, so the cap holds before asking.
        self._reserved: dict[str, int] = {}
        sio.on("connect", self._connect)
        sio.on("disconnect", self._disconnect)
        for event, handler in (
            ("askQuestion", self._ask_question),
            ("ask", self._ask),
            ("watch", self._watch),
            ("unwatch", self._unwatch),
            ("cancel", self._cancel),
            (UNREADABLE, self._unreadable),
        ):
            sio.on(event, self._guard(event, handler))

    @property
    def viewers(self) -> int:
        return sum(len(w) for w in self._watches.values())

    def queued(self) -> list[int]:
        """Per socket, the packets waiting to be written."""
        queues = map(self._queue_of, list(self._watches))
        return [q.qsize() for q in queues if q is not None]

    def _queue_of(self, sid: str) -> asyncio.Queue[Any] | None:
        return self._engine_queue(self.sio.manager.eio_sid_from_sid(sid, "/"))

    def _engine_queue(self, eio_sid: str | None) -> asyncio.Queue[Any] | None:
        socket = self.sio.eio.sockets.get(eio_sid) if eio_sid is not None else None
        queue = getattr(socket, "queue", None)
        return queue if isinstance(queue, asyncio.Queue) else None

    async def _emit(self, sid: str, event: str, data: Any) -> None:
        await self._emit_all(sid, [(event, data)])

    async def _emit_all(self, sid: str, events: list[tuple[str, Any]]) -> None:
        """Emit each (event, data) in order, each once the socket has room: a slow client is
        caught up from Redis, not queued for.

        A packet is what `sio.emit(event, data, to=sid)` sends, a Socket.IO EVENT for the
        default namespace ("2" + JSON array), encoded once with orjson and handed straight
        to engine.io: py-spy of the gateway at 100 answers x 20 tokens/s put a quarter of
        its CPU under sio.emit (Packet.data_is_binary walking every payload, the room
        lookup, the stdlib json encoder) for what is one string per chunk. When the
        socket's writer is idle on a websocket, they are written from this task
        (`LeanSocket.send_now`); else queued together, so the writer wakes once for them
        (over a websocket each packet is still its own frame: Engine.IO's framing).
        """
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, "/")
        if eio_sid is None:
            return  # disconnected: its watches are being cancelled
        packets = [_event_packet(event, data) for event, data in events]
        socket = self.sio.eio.sockets.get(eio_sid)
        if isinstance(socket, LeanSocket) and await socket.send_now(
            ["4" + packet for packet in packets]  # each as an Engine.IO MESSAGE
        ):
            return
        queue = self._engine_queue(eio_sid)
        for packet in packets:
            delay_s = 0.005
            while queue is not None and queue.qsize() >= SOCKET_QUEUE_MAX:
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 0.1)
                queue = self._engine_queue(eio_sid)
            await self.sio.eio.send(eio_sid, packet)

    def _direct(
        self, sid: str, events: Callable[[list[Entry]], list[tuple[str, Any]]]
    ) -> Direct | None:
        """A viewer's direct write (relay.Subscription): its entries' events written to its
        websocket in the relay's read callback, as `_emit_all` packs them, while engine.io's
        writer is idle (`LeanSocket.write_now`); None when the socket is not a LeanSocket."""
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, "/")
        socket = self.sio.eio.sockets.get(eio_sid) if eio_sid is not None else None
        if not isinstance(socket, LeanSocket):
            return None
        write_now = socket.write_now

        def write(batch: list[Entry]) -> bool:
            # each as an Engine.IO MESSAGE, as `_emit_all` writes them
            return write_now(["4" + _event_packet(event, data) for event, data in events(batch)])

        return write

    def _caller(self, sid: str) -> Caller:
        caller = self._callers.get(sid)
        if caller is None:  # an event racing its socket's disconnect
            raise Unauthorized("this connection is closed")
        return caller

    def _guard(self, event: str, handler: Handler) -> Handler:
        """Bad input becomes an `error` event and an `{error}` ack, never a crash."""

        async def guarded(sid: str, data: Any = None) -> Any:
            try:
                return await handler(sid, data)
            except (InvalidInput, NotFound) as e:
                message = str(e)
            except TokenRelayError as e:
                log.warning("socket %s: %s failed: %s", sid, event, e)
                message = str(e)
            except Exception:
                # Every event gets an answer: a client must never wait on an ack that never comes.
                log.exception("socket %s: %s failed unexpectedly", sid, event)
                message = f"{event} failed: an internal error (logged by the server)"
            await self.sio.emit("error", {"message": message, "event": event}, to=sid)
            return {"error": message}

        return guarded

    async def _connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        try:
            caller = self._access.caller(socket_token(auth, environ), socket_address(environ))
        except Unauthorized as e:
            raise socketio.exceptions.ConnectionRefusedError(str(e)) from e
        self._callers[sid] = caller
        self._watches[sid] = {}
        metrics.SOCKETS.inc()

    async def _disconnect(self, sid: str, reason: Any = None) -> None:
        metrics.SOCKETS.dec()
        self._callers.pop(sid, None)
        self._reserved.pop(sid, None)
        for task in self._watches.pop(sid, {}).values():
            task.cancel()

    def _check_room(self, sid: str, reserved: int = 0) -> None:
        """InvalidInput when this socket is at its cap of watches (and asks being made)."""
        held = len(self._watches.get(sid, {})) + self._reserved.get(sid, 0) - reserved
        if held >= MAX_WATCHES_PER_SOCKET:
            raise InvalidInput(
                f"this connection already watches {MAX_WATCHES_PER_SOCKET} answers; "
                "unwatch one (or wait for one to end) before asking or watching another"
            )

    @contextmanager
    def _slot(self, sid: str) -> Iterator[None]:
        """Hold a watch slot while asking, so the cap is checked before anything is asked."""
        self._check_room(sid)
        self._reserved[sid] = self._reserved.get(sid, 0) + 1
        try:
            yield
        finally:
            if sid in self._reserved:
                self._reserved[sid] -= 1

    def _own(
        self, sid: str, key: str, coro: Coroutine[Any, Any, T], *, reserved: bool = False
    ) -> asyncio.Task[T]:
        watches = self._watches.get(sid)
        if watches is None:  # disconnected while asking: nobody to relay to, nothing to keep
            coro.close()
            raise Unauthorized("this connection is closed")
        old = watches.pop(key, None)
        if old is not None:
            old.cancel()
        else:
            try:
                self._check_room(sid, reserved=1 if reserved else 0)
            except InvalidInput:
                coro.close()
                raise
        task = asyncio.ensure_future(coro)
        watches[key] = task

        def forget(t: asyncio.Task[T]) -> None:
            if watches.get(key) is t:
                del watches[key]
            if not t.cancelled() and t.exception() is not None:
                log.error("socket %s: watch of %s failed: %r", sid, key, t.exception())

        task.add_done_callback(forget)
        return task

    # -- the seed's protocol ------------------------------------------------

    async def _ask_question(self, sid: str, data: Any) -> dict[str, str]:
        svc = self._services()
        caller = self._caller(sid)
        asked = ask_input(data, svc.settings, question_field="topicQuestion", default_topic=None)
        key = idempotency_key(data.get("request_id"))
        record, _ = await self._ask_holding(
            sid, caller, asked, key, None, "seed:", lambda r: self._relay_seed(sid, r.id)
        )
        return {"id": record.id}

    async def _relay_seed(self, sid: str, qid: str) -> None:
        """Plain-string `chunk` events: START marker, the text, END marker (the seed's page)."""
        relay = self._services().relay
        assert relay is not None

        def events(batch: list[Entry]) -> list[tuple[str, Any]]:
            return [e for entry in batch for e in _seed_events(qid, entry)]

        async for batch in relay.batches(qid, "0-0", self._direct(sid, events)):
            await self._emit_all(sid, events(batch))

    # -- ask / watch / cancel -------------------------------------------------

    async def _ask(self, sid: str, data: Any) -> dict[str, Any]:
        svc = self._services()
        caller = self._caller(sid)
        asked = ask_input(data, svc.settings)
        key = idempotency_key(data.get("request_id"))
        watch = data.get("watch", False)
        if not isinstance(watch, bool):
            raise InvalidInput("'watch' must be true or false")
        if watch and not asked.stream:
            raise InvalidInput("'watch' needs 'stream': true (stream:false answers in the ack)")
        context = await follow_up(svc, self._access, caller, data.get("follows"))
        if watch:
            # Ask, then watch from the first entry, in one round trip: the watch starts as
            # the ask is queued, so the ack goes out before any of its `answer` events (both
            # wait in the same engine.io queue) and nothing is missed.
            record, _ = await self._ask_holding(
                sid, caller, asked, key, context, "", lambda r: self._relay_answer(sid, r, "0-0")
            )
            return {"id": record.id, "status": record.status.value}
        if asked.stream:
            record = await answers.ask(svc, self._access, caller, asked, key, context)
            return {"id": record.id}
        # Waiting for the whole answer holds a viewer: it takes a watch slot like any other.
        record, waiting = await self._ask_holding(
            sid, caller, asked, key, context, "whole:", lambda r: self._wait_whole(r.id)
        )
        await asyncio.wait({waiting})  # not `await waiting`: a disconnect cancels it
        if waiting.cancelled():
            return {"id": record.id, "error": "the connection closed before the answer ended"}
        try:
            whole = waiting.result()
        except AnswerTimeout as e:
            return {"id": record.id, "error": str(e)}
        if not whole.ok:
            return {"id": record.id, "error": whole.last.text or whole.last.type.value}
        return {
            "id": record.id,
            "output": whole.text,
            "record": (await svc.store.record(record.id)).public(),
        }

    async def _ask_holding(
        self,
        sid: str,
        caller: Caller,
        asked: AskInput,
        key: str | None,
        context: Context | None,
        prefix: str,
        start: Callable[[QuestionRecord], Coroutine[Any, Any, T]],
    ) -> tuple[QuestionRecord, asyncio.Task[T]]:
        """Ask holding a watch slot (the cap is checked before anything is asked), then run
        `start(record)` as the socket's own, under `prefix` + the new question's id."""
        with self._slot(sid):
            record = await answers.ask(self._services(), self._access, caller, asked, key, context)
            return record, self._own(sid, prefix + record.id, start(record), reserved=True)

    async def _wait_whole(self, qid: str) -> WholeAnswer:
        return await answers.whole(self._services(), qid)

    async def _watch(self, sid: str, data: Any) -> dict[str, Any]:
        qid, after = watch_input(data)
        record, after = await answers.attach(
            self._services(), self._access, self._caller(sid), qid, after
        )
        if not answers.at_end(record, after):  # else nothing can come: hold no watch
            self._own(sid, qid, self._relay_answer(sid, record, after))
        return {"ok": True, "id": qid, "status": record.status.value}

    async def _relay_answer(self, sid: str, record: QuestionRecord, after: str) -> None:
        qid = record.id

        def events(batch: list[Entry]) -> list[tuple[str, Any]]:
            return [("answer", entry.event(qid)) for entry in batch]

        direct = self._direct(sid, events)
        async for batch in answers.follow_batches(self._services(), record, after, direct):
            await self._emit_all(sid, events(batch))

    async def _unwatch(self, sid: str, data: Any) -> dict[str, Any]:
        qid = question_id(data.get("id") if isinstance(data, dict) else data)
        task = self._watches.get(sid, {}).pop(qid, None)
        if task is not None:
            task.cancel()
        return {"ok": True}

    async def _unreadable(self, sid: str, problem: Any) -> dict[str, Any]:
        raise InvalidInput(str(problem))

    async def _cancel(self, sid: str, data: Any) -> dict[str, Any]:
        qid = question_id(data.get("id") if isinstance(data, dict) else data)
        svc = self._services()
        await answers.attach(svc, self._access, self._caller(sid), qid)
        record = await svc.store.request_cancel(qid)
        return {"ok": True, "id": qid, "status": record.status.value}


def _event_packet(event: str, data: Any) -> str:
    """What `sio.emit(event, data)` sends: a Socket.IO EVENT for the default namespace."""
    return "2" + dumps([event, data])


def _seed_events(qid: str, entry: Entry) -> list[tuple[str, Any]]:
    """The seed page's events for an entry: plain-string `chunk`s, the START marker, the text,
    the END marker (after an `error` event when the answer failed)."""
    if entry.type is EntryType.START:
        return [("chunk", f"START:{qid};<br/>")]
    if entry.type is EntryType.CHUNK:
        return [("chunk", entry.text)]
    if not entry.terminal:
        return []
    end = ("chunk", f"<br/>;END:{qid}")
    if entry.type is EntryType.ERROR:
        return [("error", {"message": entry.text, "event": "askQuestion", "id": qid}), end]
    return [end]
