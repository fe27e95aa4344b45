"""Socket.IO over a real socket: the seed's protocol unchanged, and ask/watch/cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.conftest import running_gateway
from tests.support.sockets import connected, wait_for
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
