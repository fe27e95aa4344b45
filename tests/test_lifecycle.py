"""Retention, bounded concurrency and heartbeats: nothing grows, nothing is answered twice;
a stop never hangs on one part."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from contextlib import AsyncExitStack

import httpx
import pytest
from redis.asyncio import Redis

from tests.conftest import running_gateway
from tests.support.sse import events
from tokenrelay.keys import Keys
from tokenrelay.services import close_on_exit
from tokenrelay.settings import Settings

WORDS = " ".join(f"h{n}" for n in range(30))


async def test_finished_answers_expire_after_retention(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    settings = make_settings(retention_s=1)
    keys = Keys(settings.key_prefix)
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        r = await client.post("/api/questions", json={"question": "brief", "stream": False})
        qid = r.json()["id"]
        assert 0 < await redis.pttl(keys.answer(qid)) <= 1000
        assert 0 < await redis.pttl(keys.question(qid)) <= 1000
        assert await redis.xlen(keys.requests) == 0  # acknowledged and deleted
        await asyncio.sleep(1.3)
        assert await redis.exists(keys.answer(qid), keys.question(qid)) == 0
        assert (await client.get(f"/api/questions/{qid}")).status_code == 404
        listed = (await client.get("/api/questions")).json()["questions"]
        assert listed == []
        assert await redis.zcard(keys.history) == 0  # expired ids leave the index too


async def test_retention_zero_keeps_answers(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    settings = make_settings(retention_s=0)
    keys = Keys(settings.key_prefix)
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        r = await client.post("/api/questions", json={"question": "forever", "stream": False})
        qid = r.json()["id"]
    assert await redis.pttl(keys.answer(qid)) == -1
    assert await redis.pttl(keys.question(qid)) == -1


async def test_history_is_bounded(make_settings: Callable[..., Settings], redis: Redis) -> None:
    settings = make_settings(history_max=3, scripted_rate=1000.0)
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        for n in range(5):
            await client.post("/api/questions", json={"question": f"n{n}", "stream": False})
        listed = (await client.get("/api/questions")).json()["questions"]
    assert [q["question"] for q in listed] == ["n4", "n3", "n2"]
    assert await redis.zcard(Keys(settings.key_prefix).history) == 3


async def test_worker_concurrency_is_bounded(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    settings = make_settings(worker_concurrency=2, scripted_rate=40.0, scripted_text=WORDS)
    keys = Keys(settings.key_prefix)
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        ids = [
            (await client.post("/api/questions", json={"question": f"c{n}"})).json()["id"]
            for n in range(5)
        ]
        most = 0
        while True:
            # One snapshot of every status (MULTI): read one by one, an answer read streaming
            # could end, and the next one start, before the last is read.
            async with redis.pipeline(transaction=True) as pipe:
                for i in ids:
                    pipe.hget(keys.question(i), "status")
                statuses = await pipe.execute()
            most = max(most, statuses.count("streaming"))
            if all(s == "done" for s in statuses):
                break
            await asyncio.sleep(0.05)
    assert most == 2


async def test_long_answer_is_not_reclaimed_from_a_live_worker(
    make_settings: Callable[..., Settings],
) -> None:
    """An answer lasting 6x the reclaim idle time stays with its worker (heartbeats)."""
    settings = make_settings(reclaim_idle_ms=300, scripted_rate=15.0, scripted_text=WORDS)
    async with (
        running_gateway(settings, workers=2) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        qid = (await client.post("/api/questions", json={"question": "slow"})).json()["id"]
        seen = [e async for e in events(client, f"/api/questions/{qid}/events")]
    types = [e.event for e in seen]
    assert types.count("start") == 1 and "restart" not in types
    assert types.count("chunk") == 30
    assert "".join(e.data["text"] for e in seen if e.event == "chunk") == WORDS


async def test_blocking_reads_longer_than_the_socket_timeout(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """Blocks past redis-py's default 5 s socket timeout: idle readers stay quiet and live."""
    settings = make_settings(block_ms=5_500)
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        await asyncio.sleep(6.0)  # the worker's XREADGROUP blocks through a whole block
        r = await client.post("/api/questions", json={"question": "still awake?", "stream": False})
    assert r.json()["status"] == "done"
    assert not [rec for rec in caplog.records if rec.levelname in ("WARNING", "ERROR")]


async def test_a_close_that_hangs_does_not_hang_the_stop(caplog: pytest.LogCaptureFixture) -> None:
    """Each resource's close has a deadline (services.close_on_exit): one that never returns
    is logged and left, and the others are still closed."""
    closed: list[str] = []

    async def hangs() -> None:
        await asyncio.Event().wait()

    async def closes() -> None:
        closed.append("other")

    started = time.monotonic()
    async with AsyncExitStack() as stack:
        close_on_exit(stack, "the other part", closes)
        close_on_exit(stack, "the stuck part", hangs, timeout_s=0.2)
    assert time.monotonic() - started < 5
    assert closed == ["other"]
    assert "closing the stuck part took over 0.2 s" in caplog.text


async def test_a_gateway_that_is_its_process_freezes_what_start_up_made(
    make_settings: Callable[..., Settings],
) -> None:
    """The command line's gateway (own_process) moves what start-up made out of the
    collector's reach once it is ready (a full collection scanned ~100k such objects, a
    20-30 ms pause of every viewer); an app embedded in another program leaves its
    process's collector alone."""
    settings = make_settings()
    # pytest's collection froze what it made (tests/conftest.py): frozen objects that die
    # are still freed, so that count only falls unless something freezes more.
    try:
        before = gc.get_freeze_count()
        async with running_gateway(settings) as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/healthz")).status_code == 200
            assert gc.get_freeze_count() <= before
        before = gc.get_freeze_count()
        async with running_gateway(settings, own_process=True) as url:
            async with httpx.AsyncClient(base_url=url) as client:
                assert (await client.get("/healthz")).status_code == 200
            assert gc.get_freeze_count() > before + 1_000  # ~8,000 here, beside pytest's
    finally:
        gc.unfreeze()  # and what is alive frozen again, as after collection
        gc.collect()
        gc.freeze()
