"""Workers as real processes: a killed worker's request is reclaimed, never looped forever."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from tests.conftest import running_gateway
from tests.support.sse import Event, events
from tokenrelay.keys import WORKER_GROUP
from tokenrelay.providers.guard import Timeouts
from tokenrelay.providers.scripted import ScriptedProvider
from tokenrelay.services import make_store
from tokenrelay.settings import Settings
from tokenrelay.wire import Entry, EntryType, QuestionRequest
from tokenrelay.worker import Answer, ChunkWriter, Generator

WORDS = " ".join(f"t{n}" for n in range(40))


@contextmanager
def worker_process(settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    """`tokenrelay worker` as its own process, configured through the environment."""
    env = {
        **os.environ,
        "REDIS_URL": str(settings.redis_url),
        "TOKENRELAY_KEY_PREFIX": settings.key_prefix,
        "TOKENRELAY_PROVIDER": "scripted",
        "TOKENRELAY_SCRIPTED_TEXT": settings.scripted_text,
        "TOKENRELAY_SCRIPTED_RATE": str(settings.scripted_rate),
        "TOKENRELAY_RECLAIM_IDLE_MS": str(settings.reclaim_idle_ms),
        "TOKENRELAY_MAX_DELIVERIES": str(settings.max_deliveries),
        "TOKENRELAY_DATA_DIR": str(settings.data_dir),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "--log-level", "warning", "worker"], env=env
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _kill_after_chunks(
    client: httpx.AsyncClient, qid: str, proc: subprocess.Popen[bytes], k: int
) -> list[Event]:
    seen: list[Event] = []
    async for e in events(client, f"/api/questions/{qid}/events"):
        seen.append(e)
        if sum(1 for s in seen if s.event == "chunk") == k:
            proc.kill()  # SIGKILL: no chance to clean up or acknowledge
            proc.wait()
            break
    return seen


async def test_killed_worker_request_is_reclaimed_and_finished(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(scripted_text=WORDS, scripted_rate=20.0, reclaim_idle_ms=1000)
    async with (
        running_gateway(settings, workers=0) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        with worker_process(settings) as first:
            qid = (await client.post("/api/questions", json={"question": "crash"})).json()["id"]
            seen = await _kill_after_chunks(client, qid, first, 5)
        with worker_process(settings):
            seen += [
                e
                async for e in events(
                    client, f"/api/questions/{qid}/events", {"Last-Event-ID": seen[-1].id}
                )
            ]
        record = (await client.get(f"/api/questions/{qid}")).json()
    types = [e.event for e in seen]
    assert types[0] == "start" and types[-1] == "end"
    assert types.count("start") == 1
    # The scripted model is deterministic, so the new worker continues without a seam.
    assert "restart" not in types
    assert "".join(e.data["text"] for e in seen if e.event == "chunk") == WORDS
    assert record["question"]["status"] == "done"
    assert record["answer"] == WORDS


async def test_request_delivered_too_often_ends_failed(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    settings = make_settings(
        scripted_text=WORDS, scripted_rate=20.0, reclaim_idle_ms=500, max_deliveries=1
    )
    async with (
        running_gateway(settings, workers=0) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        with worker_process(settings) as first:
            qid = (await client.post("/api/questions", json={"question": "doom"})).json()["id"]
            await _kill_after_chunks(client, qid, first, 3)
        with worker_process(settings):
            tail = [e async for e in events(client, f"/api/questions/{qid}/events")]
        record = (await client.get(f"/api/questions/{qid}")).json()["question"]
    assert tail[-1].event == "error"
    assert tail[-1].data["kind"] == "undeliverable"
    assert "gave up after 2 attempts" in tail[-1].data["text"]
    assert record["status"] == "failed"
    pending = await redis.xpending(f"{settings.key_prefix}requests", "workers")
    assert pending["pending"] == 0  # acknowledged, not looping


async def test_diverging_regeneration_writes_restart(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    """A reclaimed answer whose new text differs from the partial one tells viewers to reset."""
    settings = make_settings()
    store = make_store(settings, redis)
    record = await store.ask("Redis", "diverge")
    request = QuestionRequest(record.id, "Redis", "diverge")
    await store.start(request, Entry(EntryType.START), {"status": "streaming"})
    await store.append(record.id, Entry(EntryType.CHUNK, "Something else entirely"))
    writer = ChunkWriter(store)
    writer.start()
    try:
        provider = ScriptedProvider("The real answer.", 1000.0)
        gen = Generator(store, writer, provider, Timeouts(5, 5))
        status = await Answer(store, request, None).run(gen, resumed=True)
    finally:
        await writer.stop()
    entries = await store.read_all(record.id)
    types = [e.type for e in entries]
    assert status.value == "done"
    assert types.count(EntryType.START) == 1
    assert EntryType.RESTART in types
    after_restart = entries[types.index(EntryType.RESTART) + 1 :]
    assert "".join(e.text for e in after_restart if e.type is EntryType.CHUNK) == (
        "The real answer."
    )
    assert (await store.record(record.id)).status.value == "done"


async def test_worker_stops_gracefully_on_sigterm(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    settings = make_settings()
    with worker_process(settings) as proc:
        # Running: it reads the request stream as a consumer of the group (a SIGTERM before
        # its handler is set, on a loaded machine, would end it by the default action).
        stream = make_store(settings, redis).keys.requests
        async with asyncio.timeout(60):
            while not await _consumers(redis, stream):
                assert proc.poll() is None, "the worker exited before it started"
                await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 15)
    assert code == 0


async def _consumers(redis: Redis, stream: str) -> int:
    try:
        return len(await redis.xinfo_consumers(stream, WORKER_GROUP))
    except ResponseError:  # no stream or group yet
        return 0
