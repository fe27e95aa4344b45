"""ChunkWriter against a real Valkey: appends share pipelines, cancel flags read on demand,
a Redis failure reaches every waiting append."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from tokenrelay.errors import Fenced
from tokenrelay.services import make_store
from tokenrelay.settings import Settings
from tokenrelay.store import Store
from tokenrelay.wire import Entry, EntryType
from tokenrelay.worker import ChunkWriter
from tokenrelay.worker.writer import MAX_BATCH


@pytest.fixture
def store(make_settings: Callable[..., Settings], redis: Redis) -> Store:
    return make_store(make_settings(), redis)


@pytest.fixture
async def writer(store: Store) -> AsyncIterator[ChunkWriter]:
    w = ChunkWriter(store)
    w.start()
    yield w
    await w.stop()


async def round_trips(redis: Redis) -> dict[str, int]:
    """Calls of the commands a write could send, as this Valkey counted them (the session
    server serves only this test process)."""
    stats: Any = await redis.info("commandstats")
    names = ("hget", "evalsha", "eval", "xadd")
    return {n: int(stats.get(f"cmdstat_{n}", {}).get("calls", 0)) for n in names}


async def test_concurrent_appends_share_pipelines(store: Store, writer: ChunkWriter) -> None:
    questions = [f"q{n}" for n in range(20)]
    per_question = 15
    jobs = [
        (qid, Entry(EntryType.CHUNK, f"{qid}:{i}"))
        for i in range(per_question)
        for qid in questions
    ]
    results = await asyncio.gather(
        *(writer.append(qid, entry, check_cancel=False) for qid, entry in jobs)
    )
    assert writer.written == len(jobs)
    assert 1 <= writer.batches < len(jobs), "every append paid its own round trip"
    for qid in questions:
        stored = await store.read_all(qid)
        # In the order appended, each once, and each append got its own entry's id.
        assert [e.text for e in stored] == [f"{qid}:{i}" for i in range(per_question)]
        mine = [r.entry_id for (q, _), r in zip(jobs, results, strict=True) if q == qid]
        assert mine == [e.entry_id for e in stored]
    assert not any(r.cancel_requested for r in results)


async def test_sequential_appends_each_flush(store: Store, writer: ChunkWriter) -> None:
    """With one append at a time there is nothing to share: each still completes promptly."""
    for i in range(5):
        await writer.append("solo", Entry(EntryType.CHUNK, str(i)))
    assert (writer.batches, writer.written) == (5, 5)
    assert [e.text for e in await store.read("solo")] == ["0", "1", "2", "3", "4"]


async def test_batches_are_bounded(store: Store, writer: ChunkWriter) -> None:
    n = MAX_BATCH + 500
    await asyncio.gather(
        *(writer.append("big", Entry(EntryType.CHUNK, "x"), check_cancel=False) for _ in range(n))
    )
    assert writer.written == n
    assert writer.batches >= 2, f"{n} appends went out in one pipeline past MAX_BATCH"
    assert len(await store.read_all("big")) == n


async def test_cancel_flag_is_reported_only_when_asked(store: Store, writer: ChunkWriter) -> None:
    """Each write is one script call that checks the answer's epoch and reads its cancel flag
    in the same round trip (so reading it costs no extra command); the flag is reported only
    to writes that asked for it."""
    asked = await store.ask("t", "q")
    await store.request_cancel(asked.id)

    before = await round_trips(store.redis)
    unchecked = await asyncio.gather(
        *(
            writer.append(asked.id, Entry(EntryType.CHUNK, "u"), check_cancel=False)
            for _ in range(50)
        )
    )
    after = await round_trips(store.redis)
    scripts = (after["evalsha"] + after["eval"]) - (before["evalsha"] + before["eval"])
    assert scripts == 50, "one script call per write"
    assert not any(a.cancel_requested for a in unchecked)

    checked = await asyncio.gather(
        *(writer.append(asked.id, Entry(EntryType.CHUNK, "c")) for _ in range(10))
    )
    assert all(a.cancel_requested for a in checked)

    other = await store.ask("t", "not cancelled")
    assert not (await writer.append(other.id, Entry(EntryType.CHUNK, "x"))).cancel_requested


async def test_a_redis_failure_reaches_every_waiter(make_settings: Callable[..., Settings]) -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", decode_responses=True)
    writer = ChunkWriter(make_store(make_settings(), dead))
    writer.start()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(
                *(writer.append(f"q{n % 3}", Entry(EntryType.CHUNK, "x")) for n in range(12)),
                return_exceptions=True,
            ),
            timeout=60,
        )
    finally:
        await writer.stop()
        await dead.aclose()
    assert all(isinstance(r, RedisError) for r in results), results
    assert writer.written == 0


async def test_the_writer_survives_a_failed_batch(store: Store, writer: ChunkWriter) -> None:
    await store.redis.set(store.keys.answer("broken"), "not a stream")  # XADD: WRONGTYPE
    results = await asyncio.gather(
        writer.append("fine", Entry(EntryType.CHUNK, "a")),
        writer.append("broken", Entry(EntryType.CHUNK, "b")),
        return_exceptions=True,
    )
    # One pipeline: its failure is handed to each append that was in it.
    assert all(isinstance(r, ResponseError) for r in results), results
    after = await writer.append("fine", Entry(EntryType.CHUNK, "later"))
    assert (await store.read("fine"))[-1].entry_id == after.entry_id


async def test_stop_cancels_appends_still_queued(store: Store) -> None:
    writer = ChunkWriter(store)  # never started: nothing will flush
    waiting = asyncio.create_task(writer.append("q", Entry(EntryType.CHUNK, "x")))
    await asyncio.sleep(0.01)
    await writer.stop()
    await writer.stop()  # safe twice
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await store.read("q") == []


async def test_an_outbox_coalesces_chunks_queued_behind_a_write(
    store: Store, writer: ChunkWriter
) -> None:
    """The answer does not wait for its writes: chunks that queue up while a write is on its
    way go out as one entry, in order, with nothing lost."""
    asked = await store.ask("t", "q")
    box = writer.outbox(asked.id, await store.begin(asked.id))
    box.put(Entry(EntryType.START))
    for i in range(200):
        box.put(Entry(EntryType.CHUNK, f"{i} "))
    await box.drain()
    entries = await store.read_all(asked.id)
    assert entries[0].type is EntryType.START
    assert "".join(e.text for e in entries[1:]) == "".join(f"{i} " for i in range(200))
    assert 2 <= len(entries) < 50, len(entries)
    assert box.written == len(entries)
    assert not box.cancel_requested
    await store.request_cancel(asked.id)
    box.put(Entry(EntryType.CHUNK, "more"))
    await box.drain()
    assert box.cancel_requested  # learned from the write itself


async def test_an_outbox_of_an_old_epoch_is_fenced(store: Store, writer: ChunkWriter) -> None:
    asked = await store.ask("t", "q")
    old = writer.outbox(asked.id, await store.begin(asked.id))
    old.put(Entry(EntryType.CHUNK, "mine "))
    await old.drain()
    new = writer.outbox(asked.id, await store.begin(asked.id))  # another delivery took over
    old.put(Entry(EntryType.CHUNK, "too late"))
    with pytest.raises(Fenced):
        await old.drain()
    with pytest.raises(Fenced):
        old.put(Entry(EntryType.CHUNK, "again"))
    new.put(Entry(EntryType.CHUNK, "theirs"))
    await new.drain()
    assert [e.text for e in await store.read_all(asked.id)] == ["mine ", "theirs"]
