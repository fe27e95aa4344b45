"""Socket.IO: the seed's `askQuestion`/`chunk` protocol and the richer ask/watch/cancel.

Every watch is a task owned by its socket; a disconnect cancels them all, so no
reader outlives its client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import socketio

from tokenrelay import metrics
from tokenrelay.errors import InvalidInput, NotFound, TokenRelayError
from tokenrelay.gateway.answers import whole_answer
from tokenrelay.gateway.inputs import ask_input, question_id, watch_input
from tokenrelay.services import Services
from tokenrelay.wire import EntryType

log = logging.getLogger(__name__)

Handler = Callable[[str, Any], Awaitable[Any]]


class SocketGateway:
    def __init__(self, sio: socketio.AsyncServer, services: Callable[[], Services]) -> None:
        self.sio = sio
        self._services = services
        self._watches: dict[str, dict[str, asyncio.Task[None]]] = {}
        sio.on("connect", self._connect)
        sio.on("disconnect", self._disconnect)
        for event, handler in (
            ("askQuestion", self._ask_question),
            ("ask", self._ask),
            ("watch", self._watch),
            ("unwatch", self._unwatch),
            ("cancel", self._cancel),
        ):
            sio.on(event, self._guard(event, handler))

    @property
    def viewers(self) -> int:
        return sum(len(w) for w in self._watches.values())

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
            await self.sio.emit("error", {"message": message, "event": event}, to=sid)
            return {"error": message}

        return guarded

    async def _connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        self._watches[sid] = {}
        metrics.SOCKETS.inc()

    async def _disconnect(self, sid: str, reason: Any = None) -> None:
        metrics.SOCKETS.dec()
        for task in self._watches.pop(sid, {}).values():
            task.cancel()

    def _own(self, sid: str, key: str, coro: Awaitable[None]) -> None:
        watches = self._watches.setdefault(sid, {})
        old = watches.pop(key, None)
        if old is not None:
            old.cancel()
        task = asyncio.ensure_future(coro)
        watches[key] = task

        def forget(t: asyncio.Task[None]) -> None:
            if watches.get(key) is t:
                del watches[key]
            if not t.cancelled() and t.exception() is not None:
                log.error("socket %s: watch of %s failed: %r", sid, key, t.exception())

        task.add_done_callback(forget)

    # -- the seed's protocol ------------------------------------------------

    async def _ask_question(self, sid: str, data: Any) -> dict[str, str]:
        svc = self._services()
        asked = ask_input(data, svc.settings, question_field="topicQuestion", default_topic=None)
        record = await svc.store.ask(asked.topic, asked.question)
        self._own(sid, f"seed:{record.id}", self._relay_seed(sid, record.id))
        return {"id": record.id}

    async def _relay_seed(self, sid: str, qid: str) -> None:
        """Plain-string `chunk` events: START marker, the text, END marker (the seed's page)."""
        relay = self._services().relay
        assert relay is not None
        async for entry in relay.follow(qid):
            if entry.type is EntryType.START:
                await self.sio.emit("chunk", f"START:{qid};<br/>", to=sid)
            elif entry.type is EntryType.CHUNK:
                await self.sio.emit("chunk", entry.text, to=sid)
            elif entry.terminal:
                if entry.type is EntryType.ERROR:
                    await self.sio.emit(
                        "error", {"message": entry.text, "event": "askQuestion", "id": qid}, to=sid
                    )
                await self.sio.emit("chunk", f"<br/>;END:{qid}", to=sid)

    # -- ask / watch / cancel -------------------------------------------------

    async def _ask(self, sid: str, data: Any) -> dict[str, Any]:
        svc = self._services()
        asked = ask_input(data, svc.settings)
        record = await svc.store.ask(asked.topic, asked.question)
        if asked.stream:
            return {"id": record.id}
        assert svc.relay is not None
        whole = await whole_answer(svc.relay, record.id)
        if not whole.ok:
            return {"id": record.id, "error": whole.last.text or whole.last.type.value}
        return {
            "id": record.id,
            "output": whole.text,
            "record": (await svc.store.record(record.id)).public(),
        }

    async def _watch(self, sid: str, data: Any) -> dict[str, Any]:
        qid, after = watch_input(data)
        record = await self._services().store.record(qid)  # NotFound for unknown ids
        self._own(sid, qid, self._relay_answer(sid, record.id, after))
        return {"ok": True, "id": qid, "status": record.status.value}

    async def _relay_answer(self, sid: str, qid: str, after: str) -> None:
        relay = self._services().relay
        assert relay is not None
        async for entry in relay.follow(qid, after):
            await self.sio.emit("answer", entry.event(qid), to=sid)

    async def _unwatch(self, sid: str, data: Any) -> dict[str, Any]:
        qid = question_id(data.get("id") if isinstance(data, dict) else data)
        task = self._watches.get(sid, {}).pop(qid, None)
        if task is not None:
            task.cancel()
        return {"ok": True}

    async def _cancel(self, sid: str, data: Any) -> dict[str, Any]:
        qid = question_id(data.get("id") if isinstance(data, dict) else data)
        record = await self._services().store.request_cancel(qid)
        return {"ok": True, "id": qid, "status": record.status.value}
