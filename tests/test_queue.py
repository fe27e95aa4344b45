"""The request queue under pressure, over real HTTP: a full backlog refuses new asks instead
of forgetting queued ones, one caller cannot crowd out another, and a queued question whose
request was lost ends failed instead of waiting for ever."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.conftest import running_gateway
from tests.faults_report import record
from tests.support.sse import events
from tokenrelay.keys import Keys
from tokenrelay.settings import Settings

# Part of `make reliability` (its rows), and of `make test` like every faults scenario.
pytestmark = pytest.mark.faults

TERMINAL = {"done", "failed", "cancelled"}


async def _statuses(client: httpx.AsyncClient, qids: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for qid in qids:
        status = (await client.get(f"/api/questions/{qid}")).json()["question"]["status"]
        counts[status] = counts.get(status, 0) + 1
    return counts


async def test_a_full_backlog_refuses_and_every_accepted_question_is_answered(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    settings = make_settings(max_queued=100, max_queued_per_caller=1000, scripted_rate=2000.0)
    async with (
        running_gateway(settings, workers=0) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        replies = await asyncio.gather(
            *(client.post("/api/questions", json={"question": f"q{n}"}) for n in range(400))
        )
        accepted = [r.json()["id"] for r in replies if r.status_code == 202]
        refused = [r for r in replies if r.status_code != 202]
        # Nothing answers yet: everything accepted is still queued, nothing was trimmed.
        waiting = await redis.xlen(Keys(settings.key_prefix).requests)
        async with running_gateway(settings, workers=1):
            async with asyncio.timeout(60):
                while (await _statuses(client, accepted)).get("done", 0) < len(accepted):
                    await asyncio.sleep(0.2)
        ttl = await redis.ttl(Keys(settings.key_prefix).question(accepted[0]))
    assert len(accepted) == 100 and waiting == 100
    assert len(refused) == 300
    assert all(r.status_code == 503 for r in refused)
    assert all(int(r.headers["Retry-After"]) > 0 for r in refused)
    assert "full" in refused[0].json()["error"]
    assert ttl > 0  # records expire whatever happens
    record(
        "Asks past a full backlog (TOKENRELAY_MAX_QUEUED=100)",
        order=900,
        load="400 concurrent POST /api/questions, no worker running",
        faults="a backlog cap of 100",
        lost=0,
        doubled=0,
        result=f"pass: {len(accepted)} accepted, {len(refused)} refused with 503 + Retry-After; "
        "the stream kept all 100 and every accepted question ended done once a worker started",
    )


async def _first_chunk_s(client: httpx.AsyncClient, token: str) -> float:
    headers = {"Authorization": f"Bearer {token}"}
    started = time.monotonic()
    reply = await client.post("/api/questions", json={"question": "me?"}, headers=headers)
    assert reply.status_code == 202, reply.text
    async for event in events(client, f"/api/questions/{reply.json()['id']}/events", headers):
        if event.event == "chunk":
            return time.monotonic() - started
    raise AssertionError("no chunk")


async def test_one_caller_at_its_cap_does_not_delay_another(
    make_settings: Callable[..., Settings],
) -> None:
    """Caller A holds its maximum of unfinished questions; caller B's first token comes
    within 2x of what it takes on an idle server (or 0.25 s more: a shared machine's noise;
    queued behind A's answers it would wait seconds), and A's next ask is refused with 429."""
    greedy, polite = "a" * 24, "b" * 24
    settings = make_settings(
        api_keys=f"{greedy},{polite}",
        max_queued_per_caller=20,
        scripted_rate=2.0,  # A's answers take long: they hold their places
        worker_concurrency=32,
    )
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        idle = min([await _first_chunk_s(client, polite) for _ in range(3)])
        auth = {"Authorization": f"Bearer {greedy}"}
        held = [
            await client.post("/api/questions", json={"question": f"a{n}"}, headers=auth)
            for n in range(20)
        ]
        over = await client.post("/api/questions", json={"question": "a21"}, headers=auth)
        busy = min([await _first_chunk_s(client, polite) for _ in range(3)])
    assert all(r.status_code == 202 for r in held)
    assert over.status_code == 429 and int(over.headers["Retry-After"]) > 0
    assert "20 questions" in over.json()["error"]
    assert busy <= max(2 * idle, idle + 0.25), (idle, busy)
    record(
        "One caller at its cap beside another (fair share)",
        order=901,
        load="caller A: 20 slow answers (its TOKENRELAY_MAX_QUEUED_PER_CALLER); caller B asks",
        faults="A asks a 21st",
        lost=0,
        doubled=0,
        result=f"pass: A's 21st refused with 429; B's first chunk after {busy * 1000:.0f} ms "
        f"(idle server: {idle * 1000:.0f} ms)",
    )


async def test_a_queued_question_whose_request_vanished_ends_failed(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    settings = make_settings(reclaim_idle_ms=500)
    keys = Keys(settings.key_prefix)
    async with (
        running_gateway(settings, workers=0) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        qid = (await client.post("/api/questions", json={"question": "lost?"})).json()["id"]
        request_id: Any = await redis.hget(keys.question(qid), "request_id")
        assert await redis.xdel(keys.requests, request_id) == 1  # as a Redis without it would
        async with running_gateway(settings, workers=1):
            seen = [e async for e in events(client, f"/api/questions/{qid}/events")]
        record = (await client.get(f"/api/questions/{qid}")).json()["question"]
    assert seen[-1].event == "error" and seen[-1].data["kind"] == "lost"
    assert "ask again" in seen[-1].data["text"]
    assert record["status"] == "failed"
