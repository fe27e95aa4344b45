"""Asks and record reads of concurrent callers sent together (store/autopipeline.py), against a
real Valkey: one round trip for many callers, each still getting its own reply or error."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from tests.support.proxy import CuttingProxy
from tokenrelay import connection as connection_module
from tokenrelay.connection import Lane, pack, pooled_client
from tokenrelay.errors import CallerFull, NotFound, Overloaded
from tokenrelay.services import make_store
from tokenrelay.settings import Settings
from tokenrelay.store import Store
from tokenrelay.store.autopipeline import AutoPipeline, as_dict
from tokenrelay.wire import Entry, EntryType, QuestionRequest, RecordField, Status


@pytest.fixture
def store_with(make_settings: Callable[..., Settings], redis: Redis) -> Callable[..., Store]:
    def make(**overrides: Any) -> Store:
        return make_store(make_settings(**overrides), redis)

    return make


def make_store_on_pool(store: Store) -> Store:
    """The same keys and data, read without the batcher (as in a cluster: redis-py's own
    XRANGE and its reply parsing)."""
    alone = Store(store.redis, store.keys, store.limits)
    alone._together = None
    return alone


@pytest.fixture(params=["lane", "pool"])
async def together(request: pytest.FixtureRequest, redis: Redis) -> AsyncIterator[AutoPipeline]:
    """A batcher on a connection of its own (as `serve`'s), and one on the pool's."""
    if request.param == "pool":
        yield AutoPipeline(redis)
        return
    lane = Lane(redis, "-batch")
    try:
        yield AutoPipeline(redis, lane)
    finally:
        await lane.aclose()


async def test_callers_of_the_same_moment_share_one_round_trip(
    redis: Redis, together: AutoPipeline
) -> None:
    """100 callers at once: their commands reach Redis in one batch, each caller gets its own
    reply, and an error reply is only its own caller's. (Each caller sending alone waited for
    one of the pool's few connections: a burst of asks queued round trip after round trip.)"""
    await redis.set("ap:wrong-type", "a string")
    await redis.hset("ap:hash", mapping={"a": "1", "b": "é"})
    results = await asyncio.gather(
        *(together.command("ECHO", f"reply {n}") for n in range(50)),
        together.command("HGETALL", "ap:wrong-type"),
        *(together.command("ECHO", n) for n in range(50, 99)),
        together.command("HGETALL", "ap:hash", parse=as_dict),
        return_exceptions=True,
    )
    assert together.batches == 1, "the 101 commands did not go in one round trip"
    assert results[:50] == [f"reply {n}" for n in range(50)]
    assert isinstance(results[50], ResponseError) and "WRONGTYPE" in str(results[50])
    assert results[51:100] == [str(n) for n in range(50, 99)]
    assert results[100] == {"a": "1", "b": "é"}


async def test_a_caller_that_gives_up_does_not_stop_the_others(together: AutoPipeline) -> None:
    waiting = asyncio.ensure_future(together.command("ECHO", "still here"))
    others = [asyncio.ensure_future(together.command("ECHO", "still here")) for _ in range(3)]
    await asyncio.sleep(0)
    waiting.cancel()
    assert await asyncio.gather(*others) == ["still here"] * 3
    assert waiting.cancelled()


async def test_commands_issued_meanwhile_go_in_the_next_batch(together: AutoPipeline) -> None:
    """One batch in flight at a time: what is issued while it waits goes in the next one,
    whatever its size; each reply is still its own caller's."""
    first = [asyncio.ensure_future(together.command("ECHO", f"a{n}")) for n in range(3)]
    await asyncio.sleep(0)  # the first batch is on its way
    second = [asyncio.ensure_future(together.command("ECHO", f"b{n}")) for n in range(5)]
    assert await asyncio.gather(*first, *second) == [f"a{n}" for n in range(3)] + [
        f"b{n}" for n in range(5)
    ]
    assert together.batches == 2


async def test_a_batch_on_a_connection_redis_closed_is_sent_again(redis: Redis) -> None:
    """Redis closed the batching connection while it was idle (a restart, a CLIENT KILL): the
    next batch goes on a new one, and its callers get their replies."""
    lane = Lane(redis, "-batch")
    together = AutoPipeline(redis, lane)
    try:
        assert await together.command("ECHO", "first") == "first"
        clients: Any = await redis.client_list()
        mine = [c["id"] for c in clients if c.get("name", "").endswith("-batch")]
        assert len(mine) == 1
        assert await redis.client_kill_filter(_id=mine[0]) == 1
        replies = await asyncio.gather(*(together.command("ECHO", n) for n in range(4)))
        assert replies == ["0", "1", "2", "3"]
    finally:
        await lane.aclose()


async def test_a_reply_nobody_asked_for_fails_the_exchange_at_once(redis: Redis) -> None:
    """Redis sends more replies than the exchange waits for (out of step): the exchange
    fails with that at once, on a connection closed for it, not at its deadline; the lane
    then works on a new one."""
    lane = Lane(redis, "-batch")
    try:
        two = pack(["ECHO", "a"]) + pack(["ECHO", "b"])
        async with asyncio.timeout(2):  # the deadline is LANE_TIMEOUT_S, 5 s
            with pytest.raises(RedisConnectionError, match="out of step"):
                await lane.exchange(two, 1)
        assert await lane.exchange(pack(["ECHO", "in step"]), 1) == ["in step"]
    finally:
        await lane.aclose()


async def test_a_reply_its_caller_cannot_parse_is_that_callers_error_alone(
    together: AutoPipeline,
) -> None:
    """A caller's parse that fails on its reply fails that caller only; the others of the
    batch get theirs, and the batcher goes on."""

    def unreadable(reply: Any) -> Any:
        raise ValueError(f"cannot read {reply!r}")

    results = await asyncio.gather(
        together.command("ECHO", "a"),
        together.command("ECHO", "b", parse=unreadable),
        together.command("ECHO", "c"),
        return_exceptions=True,
    )
    assert results[0] == "a" and results[2] == "c"
    assert isinstance(results[1], ValueError) and "cannot read 'b'" in str(results[1])
    assert await together.command("ECHO", "after") == "after"


async def test_a_batch_whose_reply_never_comes_is_sent_again(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The network path to Redis goes silent with a batch on its way (no close, no reset):
    the batch's deadline ends that connection, and the batch goes again on a new one."""
    monkeypatch.setattr(connection_module, "LANE_TIMEOUT_S", 0.5)
    async with CuttingProxy(redis_url) as proxy:
        client = Redis.from_url(f"redis://127.0.0.1:{proxy.port}/0", decode_responses=True)
        lane = Lane(client, "-batch")
        together = AutoPipeline(client, lane)
        try:
            assert await together.command("ECHO", "heard") == "heard"
            opened = proxy.connections
            proxy.freeze_open()
            started = asyncio.get_running_loop().time()
            async with asyncio.timeout(10):
                replies = await asyncio.gather(*(together.command("ECHO", n) for n in range(3)))
            waited_s = asyncio.get_running_loop().time() - started
        finally:
            await lane.aclose()
            await client.aclose()
    assert replies == ["0", "1", "2"]
    assert proxy.connections == opened + 1
    assert 0.4 <= waited_s < 3.0, waited_s


async def test_concurrent_asks_respect_the_callers_cap_and_leave_nothing_when_refused(
    store_with: Callable[..., Store],
) -> None:
    """The whole ask is one script: of 20 asks at once by a caller allowed 5, exactly 5 are
    queued, and the 15 refused leave no record, history entry, request or place."""
    store = store_with(max_queued_per_caller=5)
    await store.ensure_group()
    results = await asyncio.gather(
        *(store.ask("t", f"q{n}", owner="a") for n in range(20)), return_exceptions=True
    )
    asked = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(asked) == 5 and all(isinstance(e, CallerFull) for e in refused)
    assert str(refused[0]) == (
        "you have 5 questions queued or being answered, the most one caller may; "
        "wait for one to finish"
    )
    assert await store.redis.zcard(store.keys.history) == 5
    assert await store.redis.xlen(store.keys.requests) == 5
    assert await store.redis.zcard(store.keys.caller_asks("a")) == 5
    for record in asked:
        stored = await store.record(record.id)
        assert stored.status is Status.QUEUED and stored.owner == "a"
        assert stored.request_id == record.request_id != ""
        rows: Any = await store.redis.xrange(store.keys.requests, record.request_id, "+", 1)
        assert QuestionRequest.from_fields(rows[0][1]).id == record.id


async def test_a_full_backlog_refuses_before_the_callers_place_is_taken(
    store_with: Callable[..., Store],
) -> None:
    store = store_with(max_queued=2, max_queued_per_caller=10)
    await store.ensure_group()
    await store.ask("t", "one", owner="a")
    await store.ask("t", "two", owner="b")
    with pytest.raises(Overloaded) as refused:
        await store.ask("t", "three", owner="a")
    assert not isinstance(refused.value, CallerFull)
    assert str(refused.value).startswith("tokenrelay is full: 2 questions are queued")
    assert await store.redis.zcard(store.keys.caller_asks("a")) == 1


async def test_records_read_together_and_alone_are_the_same(
    store_with: Callable[..., Store],
) -> None:
    store = store_with()
    await store.ensure_group()
    asked = [await store.ask("t", f"q{n}") for n in range(10)]
    together = await asyncio.gather(*(store.record(r.id) for r in asked))
    for record, read in zip(asked, together, strict=True):
        raw: Any = await store.redis.hgetall(store.keys.question(record.id))
        assert read.id == record.id and read.question == raw[RecordField.QUESTION]
        assert read.request_id == raw[RecordField.REQUEST_ID]
    with pytest.raises(NotFound):
        await store.record("x" * 22)


async def test_history_reads_of_a_burst_share_a_round_trip_and_read_as_the_pool_does(
    store_with: Callable[..., Store], redis: Redis
) -> None:
    """A burst's viewers each read their answer's history first: their XRANGEs go together
    (they queued for the pool's few connections), and each gets what XRANGE on the pool
    gives, chunks and other entries alike, from its cursor on."""
    store = store_with()
    qids = [f"history{n}" for n in range(30)]
    for n, qid in enumerate(qids):
        await store.append(qid, Entry(EntryType.START, "", {"topic": "t", "model": "m"}))
        for word in ("a ", "b ", f"{n} "):
            await store.append(qid, Entry(EntryType.CHUNK, word))
        await store.append(qid, Entry(EntryType.END, "", {"finish_reason": "stop"}))
    assert store._together is not None
    before = store._together.batches
    together = await asyncio.gather(*(store.read(qid) for qid in qids))
    assert 1 <= store._together.batches - before <= 2  # one, or one in flight and the rest
    alone = make_store_on_pool(store)
    for qid, read in zip(qids, together, strict=True):
        assert read == await alone.read(qid)
        assert [e.type for e in read] == [EntryType.START, *[EntryType.CHUNK] * 3, EntryType.END]
        cursor = read[1].entry_id
        assert await store.read(qid, cursor) == await alone.read(qid, cursor) == read[2:]


async def test_an_ask_after_redis_lost_its_scripts_still_queues(
    make_settings: Callable[..., Settings], redis_url: str
) -> None:
    """A restarted Redis has no scripts: the ask's EVALSHA fails in the batch (a batch sends
    no SCRIPT EXISTS) and is sent again alone, which loads the script."""
    if os.environ.get("TOKENRELAY_TEST_REDIS_URL"):
        pytest.skip("flushes the server's scripts: only on the test's own embedded Valkey")
    client = pooled_client(redis_url, size=2, name="tokenrelay-test")
    try:
        store = make_store(make_settings(), client)
        await store.ensure_group()
        await store.ask("t", "before")
        await client.script_flush()
        record = await store.ask("t", "after", owner="a")
        assert (await store.record(record.id)).request_id == record.request_id
    finally:
        await client.aclose(close_connection_pool=True)
