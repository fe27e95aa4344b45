"""Socket.IO over a real socket: the seed's protocol unchanged, and ask/watch/cancel."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import running_gateway
from tests.support.sockets import connected, wait_for
from tokenrelay.gateway.engine import LeanSocket
from tokenrelay.settings import Settings

TEXT = "A stream keeps <b>every</b> chunk; ids are cursors."


async def test_seed_protocol_unchanged(make_settings: Callable[..., Settings]) -> None:
    async with (
        running_gateway(make_settings(scripted_text=TEXT)) as url,
        connected(url) as (asker, got),
        connected(url) as (_bystander, other),
    ):
        await asker.emit("askQuestion", {"topic": "Redis", "topicQuestion": "What is XADD?"})
        await wait_for(lambda: any(str(d).startswith("<br/>;END:") for _, d in got))
        chunks = [d for e, d in got if e == "chunk"]
        assert all(isinstance(c, str) for c in chunks)
        qid = chunks[0].removeprefix("START:").removesuffix(";<br/>")
        assert chunks[0] == f"START:{qid};<br/>" and len(qid) == 22
        assert chunks[-1] == f"<br/>;END:{qid}"
        assert "".join(chunks[1:-1]) == TEXT
        await asyncio.sleep(0.2)
        assert other == []  # only the asking socket receives the answer


async def test_many_seed_clients_each_get_only_their_own(
    make_settings: Callable[..., Settings],
) -> None:
    """The seed's shared reader delivered strangers' chunks; here each socket gets its own."""
    async with running_gateway(make_settings(scripted_rate=100.0)) as url:
        async with asyncio.TaskGroup() as tg:
            results = [tg.create_task(_ask_seed(url, n)) for n in range(10)]
        answers = [r.result() for r in results]
    text = Settings.model_fields["scripted_text"].default
    assert all(a == text for a in answers)


async def _ask_seed(url: str, n: int) -> str:
    async with connected(url) as (client, got):
        await client.emit("askQuestion", {"topic": "Redis", "topicQuestion": f"q{n}"})
        await wait_for(lambda: any(str(d).startswith("<br/>;END:") for _, d in got), 20)
        chunks = [d for e, d in got if e == "chunk"]
        starts = [c for c in chunks if c.startswith("START:")]
        assert len(starts) == 1
        return "".join(chunks[1:-1])


async def test_ask_watch_and_resume_after(make_settings: Callable[..., Settings]) -> None:
    async with (
        running_gateway(make_settings(scripted_text=TEXT)) as url,
        connected(url) as (client, got),
    ):
        ack = await client.call("ask", {"topic": "Redis", "question": "go"})
        qid = ack["id"]
        ack = await client.call("watch", {"id": qid})
        assert ack["ok"] is True
        await wait_for(lambda: any(d["type"] == "end" for e, d in got if e == "answer"))
        answers = [d for e, d in got if e == "answer"]
        assert next(a["type"] for a in answers) == "start"
        assert "".join(a["text"] for a in answers if a["type"] == "chunk") == TEXT
        # Resume from the third entry: exactly the entries after it, none before.
        cut = answers[2]["entry_id"]
        got.clear()
        await client.call("watch", {"id": qid, "after": cut})
        await wait_for(lambda: any(d["type"] == "end" for e, d in got if e == "answer"))
        again = [d["entry_id"] for e, d in got if e == "answer"]
        assert again == [a["entry_id"] for a in answers[3:]]


async def test_ask_without_stream_and_cancel(make_settings: Callable[..., Settings]) -> None:
    async with (
        running_gateway(make_settings(scripted_text=TEXT, scripted_rate=500.0)) as url,
        connected(url) as (client, _got),
    ):
        ack = await client.call("ask", {"topic": "Redis", "question": "all", "stream": False})
        assert ack["output"] == TEXT and ack["record"]["status"] == "done"
    async with (
        running_gateway(make_settings(scripted_rate=10.0)) as url,
        connected(url) as (client, got),
    ):
        qid = (await client.call("ask", {"question": "slow"}))["id"]
        await client.call("watch", {"id": qid})
        await wait_for(lambda: sum(1 for e, d in got if e == "answer") >= 3)
        ack = await client.call("cancel", {"id": qid})
        assert ack["ok"] is True
        await wait_for(lambda: any(d["type"] == "cancelled" for e, d in got if e == "answer"))


async def test_bad_payloads_get_error_events(gateway: str) -> None:
    async with connected(gateway) as (client, got):
        cases: list[tuple[str, Any, str]] = [
            ("askQuestion", {"topic": "Redis"}, "topicQuestion"),
            ("askQuestion", "just a string", "JSON object"),
            ("askQuestion", {"topic": "", "topicQuestion": "hi"}, "empty"),
            ("ask", {"question": "x" * 9000}, "limit"),
            ("ask", {"question": 5}, "string"),
            ("watch", {"id": "nope"}, "not a question id"),
            ("watch", {"id": "B" * 22}, "no question"),
            ("watch", {"id": "B" * 22, "after": "bad"}, "malformed cursor"),
            ("cancel", {"id": None}, "string"),
            ("ask", None, "JSON object"),
        ]
        for event, payload, needle in cases:
            got.clear()
            ack = await client.call(event, payload)
            assert needle in ack["error"], (event, payload, ack)
            await wait_for(lambda: any(e == "error" for e, _ in got))
            (message,) = [d for e, d in got if e == "error"]
            assert message["event"] == event and needle in message["message"]
        # The connection survived all of it.
        ack = await client.call("ask", {"question": "still there?"})
        assert len(ack["id"]) == 22


async def test_ask_with_watch_streams_after_its_ack(
    make_settings: Callable[..., Settings],
) -> None:
    """`ask {watch: true}` is ask then watch in one round trip: on the wire (a raw
    websocket, so nothing reorders it) the ack comes first, then every entry of the answer,
    start to end, exactly once."""
    async with (
        running_gateway(make_settings(scripted_text=TEXT, scripted_rate=400.0)) as url,
        aiohttp.ClientSession() as session,
        session.ws_connect(url + "/socket.io/?EIO=4&transport=websocket") as ws,
    ):
        assert (await ws.receive_str()).startswith("0")
        await ws.send_str("40")
        assert (await ws.receive_str()).startswith("40")
        await ws.send_str('420["ask",{"question":"go","watch":true}]')
        packets: list[str] = []
        async with asyncio.timeout(10):
            while not any('"type":"end"' in p for p in packets):
                packet = await ws.receive_str()
                if packet == "2":
                    await ws.send_str("3")
                else:
                    packets.append(packet)
    ack = json.loads(packets[0].removeprefix("430"))[0]
    assert packets[0].startswith("430") and len(ack["id"]) == 22, packets[:2]
    assert ack["status"] in ("queued", "streaming")
    events = [json.loads(p.removeprefix("42")) for p in packets[1:]]
    assert all(name == "answer" and data["id"] == ack["id"] for name, data in events)
    entries = [data for _, data in events]
    assert entries[0]["type"] == "start" and entries[-1]["type"] == "end"
    assert "".join(e["text"] for e in entries if e["type"] == "chunk") == TEXT
    ids = [e["entry_id"] for e in entries]
    assert len(set(ids)) == len(ids)


async def test_ask_with_watch_holds_a_watch(make_settings: Callable[..., Settings]) -> None:
    """The watch `ask {watch: true}` starts is the socket's like any other: `unwatch`
    stops it, and a bad `watch` flag is refused before anything is asked."""
    async with (
        running_gateway(make_settings(scripted_rate=20.0)) as url,
        connected(url) as (client, got),
    ):
        for payload, needle in (
            ({"question": "q", "watch": "yes"}, "'watch' must be true or false"),
            ({"question": "q", "watch": True, "stream": False}, "needs 'stream': true"),
        ):
            ack = await client.call("ask", payload)
            assert needle in ack["error"], ack
        ack = await client.call("ask", {"question": "slow", "watch": True})
        qid = ack["id"]
        await wait_for(lambda: sum(1 for e, d in got if e == "answer") >= 3)
        assert (await client.call("unwatch", {"id": qid})) == {"ok": True}
        await asyncio.sleep(0.1)
        seen = sum(1 for e, _ in got if e == "answer")
        await asyncio.sleep(0.4)  # 20 tokens/s: eight more entries if it still watched
        assert sum(1 for e, _ in got if e == "answer") == seen
        assert not any(d["type"] == "end" for e, d in got if e == "answer")


async def test_live_entries_are_written_to_the_websocket_from_the_read_s_callback(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both protocols' live entries reach the client written from the relay's read callback
    (outside any task: no viewer task woken per entry), whole and in order."""
    outside: list[int] = []  # packets written by write_now outside any task
    write_now = LeanSocket.write_now

    def counting(self: LeanSocket, texts: list[str]) -> bool:
        written = write_now(self, texts)
        if written and asyncio.current_task() is None:
            outside.append(len(texts))
        return written

    monkeypatch.setattr(LeanSocket, "write_now", counting)
    settings = make_settings(scripted_text=TEXT, scripted_rate=200.0)
    async with running_gateway(settings) as url, connected(url) as (client, got):
        await client.emit("askQuestion", {"topic": "Redis", "topicQuestion": "seed"})
        await wait_for(lambda: any(str(d).startswith("<br/>;END:") for _, d in got))
        seed = [d for e, d in got if e == "chunk"]
        assert "".join(seed[1:-1]) == TEXT
        seed_outside = sum(outside)
        assert seed_outside >= len(seed) // 2, (seed_outside, len(seed))
        got.clear()
        await client.call("ask", {"topic": "Redis", "question": "watched", "watch": True})
        await wait_for(lambda: any(d["type"] == "end" for e, d in got if e == "answer"))
        answers = [d for e, d in got if e == "answer"]
        assert "".join(a["text"] for a in answers if a["type"] == "chunk") == TEXT
        ids = [a["entry_id"] for a in answers]
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(
            set(ids)
        ) == len(ids)
        assert sum(outside) - seed_outside >= len(answers) // 2, (outside, len(answers))
