"""Resuming a finished answer from its last entry: nothing can follow a terminal entry, so
nothing may wait for one.

FAILS today. `attach` refuses a cursor past an answer's last entry ("a watch from there
would wait forever", gateway/inputs.reachable_cursor) but accepts the last entry itself;
when that entry is terminal, `Relay.follow` subscribes and waits for entries that never
come. An SSE reconnect with `Last-Event-ID` = the `end` entry's id (what a browser's
EventSource sends when it reconnects after the stream closed) stays open for ever with
pings, and a Socket.IO `watch` from there holds a viewer (and a key in the shared XREAD)
until the client leaves. Fix: when the cursor is the answer's last entry and that entry
is terminal, answer at once (SSE: 204 No Content, which also stops an EventSource from
reconnecting; Socket.IO: an ack saying it has ended, and no watch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from tests.conftest import running_gateway
from tests.support.sockets import connected
from tests.support.sse import Event, events
from tokenrelay.settings import Settings

TEXT = "one two three four five"


async def _finished(client: httpx.AsyncClient) -> tuple[str, list[Event]]:
    r = await client.post("/api/questions", json={"question": "q", "stream": False})
    qid = r.json()["id"]
    return qid, [e async for e in events(client, f"/api/questions/{qid}/events")]


async def _viewers(client: httpx.AsyncClient) -> int:
    return int((await client.get("/healthz")).json()["viewers"])


async def test_sse_resumed_after_the_end_closes_at_once(
    make_settings: Callable[..., Settings],
) -> None:
    async with (
        running_gateway(make_settings(scripted_text=TEXT)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        qid, full = await _finished(client)
        assert full[-1].event == "end"
        path = f"/api/questions/{qid}/events"
        # The control: from the last chunk, exactly the end entry follows.
        tail = [e async for e in events(client, path, {"Last-Event-ID": full[-2].id})]
        assert [e.id for e in tail] == [full[-1].id]

        for headers, query in (({"Last-Event-ID": full[-1].id}, ""), ({}, f"?after={full[-1].id}")):
            try:
                async with asyncio.timeout(5):
                    async with client.stream("GET", path + query, headers=headers) as r:
                        body = (await r.aread()).decode()
            except TimeoutError:
                raise AssertionError(
                    f"resuming after the end entry ({headers or query}) is still open after 5 s"
                ) from None
            assert r.status_code in (200, 204)
            assert "id:" not in body, "an entry after the terminal one"
        assert await _viewers(client) == 0


async def test_socketio_watch_after_the_end_holds_no_viewer(
    make_settings: Callable[..., Settings],
) -> None:
    async with (
        running_gateway(make_settings(scripted_text=TEXT)) as url,
        httpx.AsyncClient(base_url=url) as client,
        connected(url) as (sock, got),
    ):
        qid, full = await _finished(client)
        ack = await sock.call("watch", {"id": qid, "after": full[-1].id})
        assert "error" in ack or ack.get("status") == "done"
        await asyncio.sleep(1)
        assert await _viewers(client) == 0, "the watch waits for entries that cannot come"
        assert [e for e, _ in got if e == "answer"] == []
