"""The HTTP API over a real socket: asking, without-stream, history, cancel, bad input."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import running_gateway
from tests.support.sse import Parser, events
from tokenrelay.gateway.sse import EventStream
from tokenrelay.providers.scripted import split_tokens
from tokenrelay.settings import Settings

TEXT = "Streams keep every token, **even** after a reload.\n\n- one\n- two"


async def test_ask_then_read_events_to_the_end(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway) as client:
        r = await client.post("/api/questions", json={"topic": "Redis", "question": "Why?"})
        assert r.status_code == 202
        qid = r.json()["id"]
        seen = [e async for e in events(client, f"/api/questions/{qid}/events")]
    types = [e.event for e in seen]
    assert types[0] == "start" and types[-1] == "end"
    assert all(t == "chunk" for t in types[1:-1]) and len(types) > 5
    assert all(e.id == e.data["entry_id"] and e.data["id"] == qid for e in seen)
    assert seen[0].data["topic"] == "Redis" and seen[0].data["model"] == "scripted"
    text = "".join(e.data["text"] for e in seen if e.event == "chunk")
    assert text == Settings.model_fields["scripted_text"].default
    # The model's pieces; pieces queued behind a write may share an entry.
    pieces = split_tokens(Settings.model_fields["scripted_text"].default)
    assert seen[-1].data["chunks"] == len(pieces) >= len(types) - 2


async def test_ask_with_accept_event_stream_streams_in_the_same_response(
    make_settings: Callable[..., Settings],
) -> None:
    """`Accept: text/event-stream` on an ask: its events in the response, from the first,
    as the events route gives them; its id in `Location`. A retry with the same
    idempotency key streams the same answer again; `q=0` means JSON as before."""
    async with (
        running_gateway(make_settings(scripted_text=TEXT)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        accept = {"Accept": "text/event-stream", "Idempotency-Key": "one-request"}
        async with client.stream(
            "POST", "/api/questions", json={"question": "Why?"}, headers=accept
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            qid = response.headers["x-question-id"]
            assert response.headers["location"] == f"/api/questions/{qid}"
        seen = [
            e
            async for e in events(
                client, "/api/questions", accept, method="POST", json={"question": "Why?"}
            )
        ]
        assert seen[0].event == "start" and seen[-1].event == "end"
        assert all(e.data["id"] == qid and e.id == e.data["entry_id"] for e in seen)
        assert "".join(e.data["text"] for e in seen if e.event == "chunk") == TEXT
        later = [e async for e in events(client, f"/api/questions/{qid}/events")]
        assert [e.id for e in later] == [e.id for e in seen]
        r = await client.post(
            "/api/questions",
            json={"question": "Why not?"},
            headers={"Accept": "text/event-stream;q=0, application/json"},
        )
        assert r.status_code == 202 and r.json()["id"] != qid


async def test_seed_without_stream_answers_whole_output(
    make_settings: Callable[..., Settings],
) -> None:
    async with (
        running_gateway(make_settings(scripted_text=TEXT)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        r = await client.post(
            "/askQuestionWithoutStream", json={"topic": "Redis", "topicQuestion": "What?"}
        )
        assert r.status_code == 200, r.text
        assert r.json() == {"output": TEXT}
        r = await client.post("/api/questions", json={"question": "Again?", "stream": False})
        assert r.status_code == 200
        body = r.json()
        assert body["output"] == TEXT and body["status"] == "done"
        assert body["question"]["topic"] == "Redis"  # the default topic
        assert body["question"]["chunks"] > 1 and body["question"]["ttft_ms"] >= 0


async def test_record_history_and_answer_so_far(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway) as client:
        ids = []
        for n in range(3):
            r = await client.post("/api/questions", json={"question": f"q{n}", "stream": False})
            ids.append(r.json()["id"])
        r = await client.get("/api/questions", params={"limit": 2})
        listed = [q["id"] for q in r.json()["questions"]]
        assert listed == [ids[2], ids[1]]
        r = await client.get(f"/api/questions/{ids[0]}")
        body = r.json()
        assert body["question"]["status"] == "done" and body["question"]["question"] == "q0"
        assert body["answer"] == Settings.model_fields["scripted_text"].default
        assert body["entries"][0]["type"] == "start" and body["entries"][-1]["type"] == "end"
        assert body["question"]["last_entry_id"] == body["entries"][-1]["entry_id"]


async def test_cancel_mid_answer(make_settings: Callable[..., Settings]) -> None:
    async with (
        running_gateway(make_settings(scripted_rate=20.0)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        qid = (await client.post("/api/questions", json={"question": "long?"})).json()["id"]
        seen = []
        async for e in events(client, f"/api/questions/{qid}/events"):
            seen.append(e)
            if sum(1 for s in seen if s.event == "chunk") == 3:
                r = await client.post(f"/api/questions/{qid}/cancel")
                assert r.status_code == 202 and r.json()["cancelling"] is True
        assert seen[-1].event == "cancelled"
        chunks = sum(1 for s in seen if s.event == "chunk")
        assert 3 <= chunks < 10  # stopped long before the 22 chunks of the full text
        record = (await client.get(f"/api/questions/{qid}")).json()["question"]
        assert record["status"] == "cancelled"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"topic": "Redis", "question": ""}, "must not be empty"),
        ({"topic": "Redis", "question": "   "}, "must not be empty"),
        ({"topic": "Redis"}, "question"),
        ({"topic": "Redis", "question": 42}, "question"),
        ({"topic": ["x"], "question": "hi"}, "topic"),
        ({"topic": "Redis", "question": "x" * 9000}, "limit is 8000"),
        ({"topic": "Redis", "question": "hi", "stream": "yes"}, "stream"),
        ({"topic": "Redis", "question": "hi", "extra": 1}, "extra"),
    ],
)
async def test_bad_ask_is_a_clear_4xx(gateway: str, body: object, needle: str) -> None:
    async with httpx.AsyncClient(base_url=gateway) as client:
        r = await client.post("/api/questions", json=body)
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]


async def test_bad_requests_are_clear_4xx(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway) as client:
        r = await client.post(
            "/api/questions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 422 and r.json()["error"]
        r = await client.post("/api/questions", content=b"x" * (1024 * 1024))
        assert r.status_code == 413 and "bytes" in r.json()["error"]
        unknown = "A" * 22
        for method, path in [
            ("GET", f"/api/questions/{unknown}"),
            ("GET", f"/api/questions/{unknown}/events"),
            ("POST", f"/api/questions/{unknown}/cancel"),
        ]:
            r = await client.request(method, path)
            assert r.status_code == 404 and "no question" in r.json()["error"], path
        r = await client.get("/api/questions/not-an-id")
        assert r.status_code == 422 and "not a question id" in r.json()["error"]
        qid = (await client.post("/api/questions", json={"question": "hi"})).json()["id"]
        for cursor in ["abc", "1-2-3", "-1", "9" * 30 + "-0"]:
            r = await client.get(f"/api/questions/{qid}/events", params={"after": cursor})
            assert r.status_code == 422 and "malformed cursor" in r.json()["error"], cursor
        r = await client.get(f"/api/questions/{qid}/events", headers={"Last-Event-ID": "garbage"})
        assert r.status_code == 422
        r = await client.get("/api/questions", params={"limit": 0})
        assert r.status_code == 422


async def test_healthz_and_openapi(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway) as client:
        health = await client.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        schema = (await client.get("/openapi.json")).json()
        assert "/api/questions/{qid}/events" in schema["paths"]
        ask = schema["paths"]["/api/questions"]["post"]["responses"]
        assert "text/event-stream" in ask["200"]["content"] and "202" in ask
        assert (await client.get("/docs")).status_code == 200


async def test_queued_answer_reaches_a_worker_started_later(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    async with (
        running_gateway(settings, workers=0) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        qid = (await client.post("/api/questions", json={"question": "later"})).json()["id"]
        await asyncio.sleep(0.3)
        record = (await client.get(f"/api/questions/{qid}")).json()["question"]
        assert record["status"] == "queued"
        async with running_gateway(settings, workers=1):
            seen = [e.event async for e in events(client, f"/api/questions/{qid}/events")]
        assert seen[0] == "start" and seen[-1] == "end"


async def test_cors_lets_allowed_origins_use_the_front_door_headers(
    make_settings: Callable[..., Settings],
) -> None:
    origin = "https://app.example"
    async with (
        running_gateway(make_settings(cors_origins=[origin])) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        r = await client.options(
            "/v1/chat/completions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-tokenrelay-id, x-tokenrelay-after",
            },
        )
        assert r.status_code == 200
        assert "x-tokenrelay-id" in r.headers["access-control-allow-headers"].lower()
        r = await client.get("/healthz", headers={"Origin": origin})
        assert r.headers["access-control-expose-headers"] == "X-TokenRelay-Id"
        r = await client.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


async def test_a_viewer_gets_the_entries_it_has_ready_in_one_write(gateway: str) -> None:
    """A finished answer replayed over SSE: its stored entries come a page at a time, each
    page in one HTTP chunk (one send, one socket write), every entry still its own event."""
    async with httpx.AsyncClient(base_url=gateway) as client:
        r = await client.post("/api/questions", json={"question": "Pages?", "stream": False})
        assert r.status_code == 200
        qid, chunks_stat = r.json()["id"], r.json()["question"]["chunks"]
    host, _, port = gateway.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        path = f"/api/questions/{qid}/events"
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b"transfer-encoding: chunked" in head.lower()
        pieces: list[bytes] = []
        async with asyncio.timeout(10):
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                pieces.append((await reader.readexactly(size + 2))[:-2])
    finally:
        writer.close()
    seen = Parser().feed(b"".join(pieces))
    assert seen[0].event == "start" and seen[-1].event == "end"
    assert len(seen) >= 5 and chunks_stat >= len(seen) - 2
    assert len(Parser().feed(pieces[0])) > 1, "the first page in one write"
    assert len(pieces) < len(seen), "entries ready together share a write"


async def test_live_entries_are_sent_from_the_read_s_callback(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SSE viewer's live entries are sent from the relay's read callback (outside any
    task: the stream's task is not woken per entry), whole and in order."""
    outside: list[int] = []
    write_now = EventStream.write_now

    def counting(self: EventStream, body: bytes) -> bool:
        written = write_now(self, body)
        if written and asyncio.current_task() is None:
            outside.append(body.count(b"\r\n\r\n"))
        return written

    monkeypatch.setattr(EventStream, "write_now", counting)
    async with (
        running_gateway(make_settings(scripted_text=TEXT, scripted_rate=200.0)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        r = await client.post("/api/questions", json={"question": "live"})
        qid = r.json()["id"]
        seen = [e async for e in events(client, f"/api/questions/{qid}/events")]
    assert seen[0].event == "start" and seen[-1].event == "end"
    assert "".join(e.data["text"] for e in seen if e.event == "chunk") == TEXT
    ids = [tuple(map(int, str(e.id).split("-"))) for e in seen]
    assert ids == sorted(set(ids)), "an entry repeated or out of order"
    assert sum(outside) >= len(seen) // 2, (outside, len(seen))
