"""Resume without gap or duplicate, many viewers of one answer, constant Redis connections."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
from redis.asyncio import Redis

from tests.conftest import running_gateway
from tests.support.sockets import connected, wait_for
from tests.support.sse import Event, events
from tokenrelay.settings import Settings

WORDS = " ".join(f"w{n}" for n in range(60))


async def _read_until(
    client: httpx.AsyncClient, url: str, k: int, headers: dict[str, str] | None = None
) -> list[Event]:
    """Read events, dropping the connection after `k` chunks (or at the end)."""
    seen: list[Event] = []
    async for e in events(client, url, headers):
        seen.append(e)
        if sum(1 for s in seen if s.event == "chunk") == k:
            break
    return seen


async def test_sse_resume_mid_answer_with_last_event_id(
    make_settings: Callable[..., Settings],
) -> None:
    async with (
        running_gateway(make_settings(scripted_text=WORDS, scripted_rate=100.0)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        qid = (await client.post("/api/questions", json={"question": "resume"})).json()["id"]
        path = f"/api/questions/{qid}/events"
        seen = await _read_until(client, path, 7)
        while seen[-1].event != "end":
            # Reconnect after a pause (the answer moves on meanwhile), as a browser would.
            await asyncio.sleep(0.05)
            seen += await _read_until(client, path, 9, {"Last-Event-ID": seen[-1].id})
    ids = [e.id for e in seen]
    assert len(ids) == len(set(ids)), "an entry was delivered twice"
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert "".join(e.data["text"] for e in seen if e.event == "chunk") == WORDS
    assert seen[-1].data["chunks"] == 60


async def test_after_query_and_finished_answer_replay(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway) as client:
        r = await client.post("/api/questions", json={"question": "done", "stream": False})
        qid = r.json()["id"]
        full = [e async for e in events(client, f"/api/questions/{qid}/events")]
        tail = [e async for e in events(client, f"/api/questions/{qid}/events?after={full[4].id}")]
    assert [e.id for e in tail] == [e.id for e in full[5:]]


async def test_two_viewers_sse_and_socketio_see_one_answer(
    make_settings: Callable[..., Settings],
) -> None:
    async with (
        running_gateway(make_settings(scripted_text=WORDS, scripted_rate=100.0)) as url,
        httpx.AsyncClient(base_url=url) as client,
        connected(url) as (sock, got),
    ):
        qid = (await client.post("/api/questions", json={"question": "two"})).json()["id"]
        await sock.call("watch", {"id": qid})
        sse = [e async for e in events(client, f"/api/questions/{qid}/events")]
        await wait_for(lambda: any(d["type"] == "end" for e, d in got if e == "answer"))
    live = [d for e, d in got if e == "answer"]
    assert [d["entry_id"] for d in live] == [e.id for e in sse]
    assert "".join(d["text"] for d in live if d["type"] == "chunk") == WORDS


async def _gateway_connection_ids(redis: Redis) -> frozenset[str]:
    clients = await redis.client_list()
    return frozenset(c["id"] for c in clients if c.get("name", "").startswith("tokenrelay-gateway"))


async def _gateway_connections(redis: Redis, before: frozenset[str]) -> int:
    """Connections named as a gateway's, but for those open `before` (an earlier test's,
    still closing, share the Valkey)."""
    return len(await _gateway_connection_ids(redis) - before)


async def test_redis_connections_constant_from_1_to_200_viewers(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    settings = make_settings(scripted_text=WORDS, scripted_rate=60.0)
    before = await _gateway_connection_ids(redis)
    async with (
        running_gateway(settings, workers=1) as url,
        httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=300)) as client,
    ):

        async def watch_all(n: int) -> list[str]:
            qids = [
                (await client.post("/api/questions", json={"question": f"v{i}"})).json()["id"]
                for i in range(max(1, n // 10))
            ]
            texts: list[str] = []

            async def view(qid: str) -> None:
                chunks = [
                    e.data["text"]
                    async for e in events(client, f"/api/questions/{qid}/events")
                    if e.event == "chunk"
                ]
                texts.append("".join(chunks))

            async with asyncio.TaskGroup() as tg:
                for i in range(n):
                    tg.create_task(view(qids[i % len(qids)]))
                while len(texts) < n // 2:  # count while viewers are live
                    await asyncio.sleep(0.05)
                    counts.append(await _gateway_connections(redis, before))
            return texts

        counts: list[int] = []
        one = await watch_all(1)
        at_one = max(counts) if counts else await _gateway_connections(redis, before)
        counts.clear()
        many = await watch_all(200)
        at_many = max(counts)
    assert one == [WORDS] and many == [WORDS] * 200
    # The pool, the relay's reading connection, the (one) worker's writing connection and
    # the store's batching connection.
    assert at_one == at_many == settings.redis_pool_size + 3, (at_one, at_many)
