"""The relay against a real Valkey: bounded buffers that overflow to XRANGE, the hand-over
from history to live entries, many answers over one reading connection."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import orjson
import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection

from tests.support.failover import lose_last_entries
from tests.support.proxy import CuttingProxy
from tests.support.sockets import wait_for
from tokenrelay import relay as relay_module
from tokenrelay.connection import dedicated_client, pooled_client
from tokenrelay.relay import BUFFER_BYTES, SWEEP_S, Relay, Subscription, _ReadSet
from tokenrelay.services import make_store
from tokenrelay.settings import Settings
from tokenrelay.store import Store
from tokenrelay.store.answers import Put, next_entry_id
from tokenrelay.wire import Entry, EntryType, QuestionRequest
from tokenrelay.worker.writer import ChunkWriter

TIMEOUT_S = 60
T = TypeVar("T")


class Harness:
    """A started relay on its own reading connection, the store it reads through (a bounded
    pool, as in the gateway), and the tasks a test starts: cancelled when it ends, passed or
    not."""

    def __init__(self, relay: Relay, store: Store, reader_name: str) -> None:
        self.relay = relay
        self.store = store
        self.reader_name = reader_name
        self.tasks: list[asyncio.Task[Any]] = []

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coro)
        self.tasks.append(task)
        return task


@asynccontextmanager
async def running_relay(settings: Settings, *, buffer_limit: int = 1000) -> AsyncIterator[Harness]:
    assert settings.redis_url is not None
    name = f"relay-test-{settings.key_prefix.rstrip(':')}"
    pool = pooled_client(settings.redis_url, size=8, name=f"{name}-pool")
    reader = dedicated_client(settings.redis_url, name=name, block_ms=settings.block_ms)
    store = make_store(settings, pool)
    relay = Relay(store, reader, block_ms=settings.block_ms, buffer_limit=buffer_limit)
    relay.start()
    harness = Harness(relay, store, name)
    try:
        yield harness
    finally:
        for task in harness.tasks:
            task.cancel()
        await asyncio.gather(*harness.tasks, return_exceptions=True)
        await relay.stop()
        await reader.aclose()
        await pool.aclose(close_connection_pool=True)


@pytest.fixture
def keys_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many answers each read of the answers due named (`_ReadSet.command_for`)."""
    counts: list[int] = []
    command_for = _ReadSet.command_for

    def counting(self: _ReadSet, keys: list[str], count: int) -> bytes:
        counts.append(len(keys))
        return command_for(self, keys, count)

    monkeypatch.setattr(_ReadSet, "command_for", counting)
    return counts


async def collect(relay: Relay, qid: str, after: str = "0-0") -> list[Entry]:
    return [entry async for entry in relay.follow(qid, after)]


async def produce(store: Store, qid: str, n: int, *, every_s: float = 0.0) -> list[str]:
    """start, `n` chunks, end; returns their entry ids."""
    ids = [await store.append(qid, Entry(EntryType.START))]
    for i in range(n):
        ids.append(await store.append(qid, Entry(EntryType.CHUNK, f"{qid}/{i} ")))
        if every_s:
            await asyncio.sleep(every_s)
    ids.append(await store.append(qid, Entry(EntryType.END)))
    return ids


async def reader_connections(redis: Redis, name: str) -> int:
    clients: Any = await redis.client_list()
    return sum(1 for c in clients if c.get("name") == name)


def ids_of(entries: list[Entry]) -> list[str]:
    return [e.entry_id for e in entries]


# -- the bounded buffer ------------------------------------------------------------------


def test_subscription_overflows_on_count_and_drops_what_it_held() -> None:
    sub = Subscription("k", limit=3)
    sub.push([Entry(EntryType.CHUNK, "a", entry_id="1-0")])
    sub.push([Entry(EntryType.CHUNK, "b", entry_id="2-0")])
    assert [e.text for e in sub.buffer] == ["a", "b"] and not sub.overflowed
    sub.push([Entry(EntryType.CHUNK, c, entry_id=f"{n}-0") for n, c in enumerate("cd", 3)])
    assert sub.overflowed and not sub.buffer and sub.ready.is_set()
    sub.push([Entry(EntryType.CHUNK, "e", entry_id="5-0")])
    assert not sub.buffer, "an overflowed viewer reads from Redis, not from the buffer"


def test_subscription_overflows_on_bytes() -> None:
    sub = Subscription("k", limit=1000)
    sub.push([Entry(EntryType.CHUNK, "x" * (BUFFER_BYTES // 2), entry_id="1-0")])
    assert not sub.overflowed
    taken = sub.take()
    assert ids_of(taken) == ["1-0"] and not sub.buffer
    # What was taken no longer counts: another half fits, then a third half does not.
    sub.push([Entry(EntryType.CHUNK, "y" * (BUFFER_BYTES // 2), entry_id="2-0")])
    assert not sub.overflowed
    sub.push([Entry(EntryType.CHUNK, "z" * (BUFFER_BYTES // 2), entry_id="3-0")])
    assert sub.overflowed and not sub.buffer


async def test_a_viewer_whose_buffer_fills_catches_up_from_redis(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    limit = 10
    async with running_relay(make_settings(), buffer_limit=limit) as h:
        relay, store = h.relay, h.store
        qid = "overflow"
        resume = asyncio.Event()
        slow: list[Entry] = []

        async def slow_viewer() -> None:
            async for entry in relay.follow(qid):
                slow.append(entry)
                if len(slow) == 1:
                    await resume.wait()  # stops reading with its subscription live

        slow_task = h.spawn(slow_viewer())
        fast_task = h.spawn(collect(relay, qid))
        await wait_for(lambda: relay.viewers == 2)  # both live, the stream still empty
        first = await store.append(qid, Entry(EntryType.START))
        await wait_for(lambda: len(slow) == 1)
        ids = [first]
        for start in range(0, 300, 30):
            batch = [
                (qid, Entry(EntryType.CHUNK, f"{i} "), False) for i in range(start, start + 30)
            ]
            ids += [str(entry_id) for entry_id, _ in await store.append_batch(batch)]
            await asyncio.sleep(0.005)  # several pushes, not one
        ids.append(await store.append(qid, Entry(EntryType.END)))

        async with asyncio.timeout(TIMEOUT_S):
            fast = await fast_task  # a stalled viewer never holds up another
            # Bounded: the stalled viewer holds at most `limit` entries, not 300.
            await wait_for(lambda: relay.lags() == [limit])
            resume.set()
            await slow_task
    assert ids_of(fast) == ids
    assert ids_of(slow) == ids, "the overflowed viewer lost or repeated entries"
    assert [e.text for e in slow[1:-1]] == [f"{i} " for i in range(300)]
    assert relay.viewers == 0 and relay.watched == 0


async def test_overflow_under_a_steady_producer(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    """Viewers that keep pausing while entries arrive: each overflows, catches up, goes
    live again, many times over; every one still sees each entry once, in order."""
    async with running_relay(make_settings(), buffer_limit=10) as h:
        relay, store = h.relay, h.store
        qid = "steady"

        async def pausing_viewer(pause_every: int) -> list[Entry]:
            got: list[Entry] = []
            async for entry in relay.follow(qid):
                got.append(entry)
                if len(got) % pause_every == 0:
                    await asyncio.sleep(0.03)
            return got

        viewers = [h.spawn(pausing_viewer(n)) for n in (7, 13, 40, 10_000)]
        await wait_for(lambda: relay.viewers == len(viewers))
        async with asyncio.timeout(TIMEOUT_S):
            ids = await produce(store, qid, 400, every_s=0.001)
            results = await asyncio.gather(*viewers)
    for got in results:
        assert ids_of(got) == ids


async def test_entries_ready_together_come_in_one_batch(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    """What arrives while a viewer is busy (writing its last batch) is handed over at once, in
    order: the viewer writes it in one go."""
    async with running_relay(make_settings()) as h:
        relay, store = h.relay, h.store
        qid = "batched"
        batches = relay.batches(qid)
        try:

            async def first() -> list[Entry]:
                return await anext(batches)

            waiting = h.spawn(first())  # live, on an empty stream
            await wait_for(lambda: relay.viewers == 1)
            start = await store.append(qid, Entry(EntryType.START))
            async with asyncio.timeout(TIMEOUT_S):
                got = [await waiting]
            chunks = [await store.append(qid, Entry(EntryType.CHUNK, f"{i}")) for i in range(5)]
            await wait_for(lambda: relay.lags() == [5])  # all five read, none taken yet
            async with asyncio.timeout(TIMEOUT_S):
                got.append(await anext(batches))
                end = await store.append(qid, Entry(EntryType.END))
                got.append(await anext(batches))
            with pytest.raises(StopAsyncIteration):
                await anext(batches)  # the terminal entry was the last
        finally:
            await batches.aclose()
    assert [ids_of(batch) for batch in got] == [[start], chunks, [end]]


# -- direct writes: live entries given to the viewer's socket in the read's callback ------


class DirectViewer:
    """A viewer of `Relay.batches` with a direct write (Subscription.direct): what the
    direct write took and what the generator yielded, in the order the viewer got them,
    and whether each direct write ran outside any task (in the read's callback)."""

    def __init__(self, relay: Relay, qid: str, *, pause_s: float = 0.0) -> None:
        self.relay, self.qid, self.pause_s = relay, qid, pause_s
        self.got: list[tuple[str, Entry]] = []  # ("direct" | "task", entry)
        self.in_tasks: list[bool] = []
        self.accept = True

    def write(self, batch: list[Entry]) -> bool:
        if not self.accept:
            return False
        self.in_tasks.append(asyncio.current_task() is not None)
        self.got += [("direct", e) for e in batch]
        return True

    async def run(self) -> None:
        async for batch in self.relay.batches(self.qid, "0-0", self.write):
            self.got += [("task", e) for e in batch]
            if self.pause_s:
                await asyncio.sleep(self.pause_s)

    def ids(self, how: str | None = None) -> list[str]:
        return [e.entry_id for h, e in self.got if how is None or h == how]


async def test_live_entries_are_written_directly_in_the_read_s_callback(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    """A viewer waiting live with nothing buffered has each new entry written by its direct
    write, outside any task (the doorbell's callback, the entries carried by their ring as
    a worker writes them): its task is not woken for them. The
    terminal entry written so ends the viewer: nothing is yielded twice."""
    async with running_relay(make_settings()) as h:
        relay, store = h.relay, h.store
        asked = await store.ask("t", "written directly")
        viewer = DirectViewer(relay, asked.id)
        task = h.spawn(viewer.run())
        await wait_for(lambda: relay.viewers == 1)
        async with asyncio.timeout(TIMEOUT_S):
            texts = [f"{n} " for n in range(20)]
            ids = await _numbered_answer(store, asked.id, texts, every_s=0.002)
            await task
    assert viewer.ids() == ids
    assert viewer.ids("direct") == ids, "live entries went through the viewer's task"
    assert viewer.in_tasks and not any(viewer.in_tasks)
    assert relay.viewers == 0 and relay.watched == 0


def test_entries_a_direct_write_refused_hold_back_all_that_follow() -> None:
    """Once the direct write could not take an entry (the socket busy), that entry and every
    later one wait in the buffer for the viewer's task, even if the socket is free again
    meanwhile: nothing overtakes what waits."""
    sub = Subscription("k", limit=100)
    taken: list[Entry] = []
    free = False

    def write(batch: list[Entry]) -> bool:
        if free:
            taken.extend(batch)
        return free

    sub.direct, sub.last = write, "1-0"
    sub.push([Entry(EntryType.CHUNK, "a", entry_id="2-0")])
    free = True
    sub.push([Entry(EntryType.CHUNK, "b", entry_id="3-0")])
    assert not taken and ids_of(list(sub.buffer)) == ["2-0", "3-0"] and sub.ready.is_set()
    sub.take()
    sub.last = "3-0"  # as the viewer's task does once it has them
    sub.push([Entry(EntryType.CHUNK, "b", entry_id="3-0"), Entry(EntryType.END, entry_id="4-0")])
    assert ids_of(taken) == ["4-0"], "an entry not after the viewer's last was written again"
    assert sub.ended and sub.direct is None and sub.last == "4-0"


async def test_a_viewer_between_direct_and_task_writes_gets_each_entry_once_in_order(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    """The direct write refuses now and then (a busy socket), the viewer's task is slow to
    write and overflows its small buffer, catching up from Redis: every entry reaches the
    viewer once, in order, whichever way it came."""
    async with running_relay(make_settings(), buffer_limit=5) as h:
        relay, store = h.relay, h.store
        viewer = DirectViewer(relay, "mixed", pause_s=0.02)
        task = h.spawn(viewer.run())
        await wait_for(lambda: relay.viewers == 1)
        refusing = True

        async def toggle() -> None:
            while refusing:
                viewer.accept = not viewer.accept
                await asyncio.sleep(random.uniform(0.001, 0.03))

        toggler = h.spawn(toggle())
        async with asyncio.timeout(TIMEOUT_S):
            ids = await produce(store, "mixed", 300, every_s=0.0005)
            refusing = False
            await toggler
            viewer.accept = True
            await task
    assert viewer.ids() == ids, "an entry was lost, repeated or overtaken"
    assert viewer.ids("direct") and viewer.ids("task"), "both ways were not exercised"


async def test_history_comes_in_pages_cut_at_the_terminal_entry(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    async with running_relay(make_settings()) as h:
        relay, store = h.relay, h.store
        qid = "paged"
        ids = await produce(store, qid, 30)
        await store.append(qid, Entry(EntryType.CHUNK, "after the end, never relayed"))
        async with asyncio.timeout(TIMEOUT_S):
            got = [batch async for batch in relay.batches(qid)]
    assert [e.entry_id for batch in got for e in batch] == ids
    assert len(got) > 1 and all(got)  # bounded pages, none empty
    assert got[-1][-1].type is EntryType.END


def test_the_packed_read_is_what_redis_py_would_send() -> None:
    """The hand-packed XREAD, after keys join, move on, leave and come back: byte for byte
    redis-py's own packing of the same command (keys and cursors in the same order)."""
    read = _ReadSet()
    for i in range(5):
        read.set(f"tokenrelay:answer:{{q{i}}}", f"17000000000{i}-0")
    read.set("tokenrelay:answer:{q1}", "17000000009-3")  # a cursor moves on
    read.remove("tokenrelay:answer:{q2}")  # a key leaves
    read.set("tokenrelay:answer:{q2}", "0-0")  # and comes back, last
    read.remove("tokenrelay:answer:{q4}")
    keys = list(read.cursors)
    assert keys == [f"tokenrelay:answer:{{q{i}}}" for i in (0, 1, 3, 2)]
    args: list[str | int] = ["XREAD", "COUNT", 512, "BLOCK", 5000, "STREAMS"]
    args += [*keys, *read.cursors.values()]
    expected = b"".join(Connection().pack_command(*args))
    assert read.command(512, 5000) == expected
    one = _ReadSet()
    one.set("k", "0-0")
    assert one.command(1, 0) == b"".join(
        Connection().pack_command("XREAD", "COUNT", 1, "BLOCK", 0, "STREAMS", "k", "0-0")
    )


# -- the hand-over from history to live entries --------------------------------------------


async def test_attach_after_a_cursor_mid_answer(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    async with running_relay(make_settings()) as h:
        relay, store = h.relay, h.store
        qid = "midway"
        written = [await store.append(qid, Entry(EntryType.START))]
        written += [await store.append(qid, Entry(EntryType.CHUNK, f"{i}")) for i in range(20)]
        resident = h.spawn(collect(relay, qid))  # keeps the key in the shared read
        await wait_for(lambda: relay.watched == 1)
        late = h.spawn(collect(relay, qid, written[5]))
        more = [await store.append(qid, Entry(EntryType.CHUNK, f"more{i}")) for i in range(10)]
        end = await store.append(qid, Entry(EntryType.END))
        async with asyncio.timeout(TIMEOUT_S):
            got = await late
            everything = await resident
    assert ids_of(got) == [*written[6:], *more, end]
    assert ids_of(everything) == [*written, *more, end]


async def test_attaches_racing_a_producer_have_no_gap_and_no_duplicate(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    """Viewers attach at random moments and cursors while entries arrive and the shared
    read is already past them: history and live entries meet without a gap or a repeat."""
    rng = random.Random(11)
    async with running_relay(make_settings()) as h:
        relay, store = h.relay, h.store
        qid = "race"
        resident = h.spawn(collect(relay, qid))
        await wait_for(lambda: relay.watched == 1)
        producing = h.spawn(produce(store, qid, 300, every_s=0.002))
        late: list[tuple[str, asyncio.Task[list[Entry]]]] = []
        while not producing.done():
            await asyncio.sleep(rng.uniform(0, 0.02))
            raw: Any = await store.redis.xrange(store.keys.answer(qid))
            cursor = rng.choice([entry_id for entry_id, _ in raw]) if raw else "0-0"
            if rng.random() < 0.2:
                cursor = "0-0"
            late.append((cursor, h.spawn(collect(relay, qid, cursor))))
        async with asyncio.timeout(TIMEOUT_S):
            ids = await producing
            everything = await resident
            results = [(cursor, await task) for cursor, task in late]
    assert ids_of(everything) == ids
    assert len(results) >= 10
    for cursor, got in results:
        expected = ids if cursor == "0-0" else ids[ids.index(cursor) + 1 :]
        assert ids_of(got) == expected, f"attached after {cursor}"


async def test_a_viewer_attaching_while_a_failover_s_lost_entries_are_rewritten_gets_them(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    """The shared read saw entries that a promoted replica never got; a viewer attaching then
    reads the stream short of the shared read's cursor. The worker writes them again with
    their own ids before anything after them (#14): the viewer gets them, once, in order.
    (Failed before: it went live after the cursor and never saw them.)"""
    async with running_relay(make_settings()) as h:
        relay, store = h.relay, h.store
        qid = "failover"
        stream, record = store.keys.answer(qid), store.keys.question(qid)
        written = [await store.append(qid, Entry(EntryType.START))]
        written += [await store.append(qid, Entry(EntryType.CHUNK, f"{i} ")) for i in range(6)]
        resident = h.spawn(collect(relay, qid))  # the shared read is at the last entry
        await wait_for(lambda: relay.watched == 1)
        raw: Any = await redis.xrange(stream)
        fields = dict(raw)
        dropped = await lose_last_entries(redis, stream, record, 2)
        assert dropped == written[-2:]
        late = h.spawn(collect(relay, qid))
        await wait_for(lambda: relay.viewers == 2)
        await asyncio.sleep(0.2)  # its history read has ended short of the cursor
        for entry_id in dropped:  # the worker writes them again, with their ids
            await redis.xadd(stream, fields[entry_id], id=entry_id)
        more = await store.append(qid, Entry(EntryType.CHUNK, "after "))
        end = await store.append(qid, Entry(EntryType.END))
        async with asyncio.timeout(TIMEOUT_S):
            got = await late
            everything = await resident
    assert ids_of(everything) == [*written, more, end]
    assert ids_of(got) == [*written, more, end]


async def test_replay_of_a_finished_answer(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    async with running_relay(make_settings()) as h:
        relay, store = h.relay, h.store
        ids = await produce(store, "done", 1200)  # more than one catch-up page
        async with asyncio.timeout(TIMEOUT_S):
            assert ids_of(await collect(relay, "done")) == ids
            assert ids_of(await collect(relay, "done", ids[700])) == ids[701:]
        # Served from history alone: the shared read never took the key.
        assert relay.watched == 0 and relay.rearms == 0


async def test_an_entry_the_relay_cannot_read_does_not_stop_the_shared_read(
    make_settings: Callable[..., Settings],
) -> None:
    """FAILS today: `_Reader._run` parses entries outside its try, and `Entry.from_fields`
    raises ValueError for a type it does not know, so one such entry (a newer worker's
    type during a rolling upgrade — `waiting` and `restart` were added that way — or an
    XADD by hand in Redis Insight) ends the reader task: every viewer of every answer on
    that gateway then waits for ever, and nothing is logged until shutdown. Fix: parse
    each entry tolerantly in the reader (skip or pass through what it cannot read, and
    log it), and restart the reader's loop after any unexpected error."""
    async with running_relay(make_settings()) as h:
        relay, store = h.relay, h.store
        h.spawn(collect(relay, "odd"))
        other = h.spawn(collect(relay, "other"))
        await wait_for(lambda: relay.watched == 2)
        await store.redis.xadd(store.keys.answer("odd"), {"type": "from-the-future", "data": "{}"})
        await asyncio.sleep(0.2)
        try:
            async with asyncio.timeout(10):
                ids = await produce(store, "other", 5)
                got = await other
        except TimeoutError:
            raise AssertionError("the other answer's viewer stopped receiving") from None
        assert ids_of(got) == ids


# -- one reader for many answers -------------------------------------------------------------


async def test_many_answers_over_one_reading_connection(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    answers = [f"a{n}" for n in range(60)]
    async with running_relay(make_settings()) as h:
        relay, store, name = h.relay, h.store, h.reader_name
        viewers = {qid: [h.spawn(collect(relay, qid)) for _ in range(2)] for qid in answers}
        await wait_for(lambda: (relay.watched, relay.viewers) == (len(answers), 2 * len(answers)))
        async with asyncio.timeout(TIMEOUT_S):
            produced = await asyncio.gather(
                *(produce(store, qid, 25, every_s=0.002) for qid in answers)
            )
            assert await reader_connections(redis, name) == 1
            for qid, ids in zip(answers, produced, strict=True):
                for task in viewers[qid]:
                    got = await task
                    assert ids_of(got) == ids
                    assert all(e.text.startswith(f"{qid}/") for e in got if e.text)
        assert relay.watched == 0 and relay.viewers == 0
        assert await reader_connections(redis, name) == 1


async def test_a_write_reads_only_the_answers_it_rang_for(
    make_settings: Callable[..., Settings], redis: Redis, keys_read: list[int]
) -> None:
    """Single node: the relay listens to the doorbell and reads the answers a write named
    without their entries (un-numbered writes: Redis chose their ids), not every answer it
    relays (a read over all of them cost Valkey O(answers) per entry); the idle ones are
    read again only by the sweep, every SWEEP_S."""
    idle = [f"idle{n}" for n in range(60)]
    async with running_relay(make_settings()) as h:
        relay, store = h.relay, h.store
        for qid in idle:
            h.spawn(collect(relay, qid))
        busy = h.spawn(collect(relay, "busy"))
        await wait_for(lambda: relay.watched == len(idle) + 1)
        await asyncio.sleep(0.2)  # the joins' reads are over
        keys_read.clear()
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(TIMEOUT_S):
            ids = await produce(store, "busy", 100, every_s=0.002)
            assert ids_of(await busy) == ids
        took_s = asyncio.get_running_loop().time() - started
    sweeps = int(took_s / SWEEP_S) + 1
    assert sum(keys_read) <= len(ids) + sweeps * (len(idle) + 1), (sum(keys_read), keys_read)


async def _numbered_answer(
    store: Store, qid: str, texts: list[str], *, every_s: float, unnumbered_every: int = 0
) -> list[str]:
    """start, chunks and end as a worker writes them (numbered, through an outbox), with an
    un-numbered append (Redis chooses its id) after every `unnumbered_every`-th chunk; the
    entry ids, in the stream's order."""
    writer = ChunkWriter(store)
    writer.start()
    try:
        epoch, after = await store.begin_answer(qid)
        box = writer.outbox(qid, epoch, after)
        box.put(Entry(EntryType.START))
        for n, text in enumerate(texts, 1):
            box.put(Entry(EntryType.CHUNK, text))
            if unnumbered_every and n % unnumbered_every == 0:
                await box.drain()
                await store.append(qid, Entry(EntryType.CHUNK, f"[{n}]"), epoch)
                await asyncio.sleep(0.002)  # the next numbered id's millisecond is past it
            await asyncio.sleep(every_s)
        await box.drain()
        end = box.number(Entry(EntryType.END))
        await store.finish(
            qid, end.entry, {}, None, epoch=epoch, entry_id=end.entry_id, after=end.after
        )
    finally:
        await writer.stop()
    return [e.entry_id for e in await store.read_all(qid)]


async def test_a_ring_carries_the_entry_that_follows_on(
    make_settings: Callable[..., Settings], redis: Redis, keys_read: list[int]
) -> None:
    """A worker's numbered entry comes with its ring (after, id, type, data): the relay
    hands it over from its cursor without reading the answer."""
    async with running_relay(make_settings()) as h:
        relay, store = h.relay, h.store
        asked = [await store.ask("t", f"carried {n}") for n in range(3)]
        viewers = [h.spawn(collect(relay, a.id)) for a in asked]
        await wait_for(lambda: relay.watched == len(asked))
        await asyncio.sleep(0.2)  # the joins' reads are over
        keys_read.clear()
        texts = [f"{n} " for n in range(60)]
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(TIMEOUT_S):
            produced = await asyncio.gather(
                *(_numbered_answer(store, a.id, texts, every_s=0.005) for a in asked)
            )
            got = await asyncio.gather(*viewers)
        took_s = asyncio.get_running_loop().time() - started
    for ids, one in zip(produced, got, strict=True):
        assert ids_of(one) == ids
        assert "".join(e.text for e in one if e.type is EntryType.CHUNK) == "".join(texts)
    sweeps = int(took_s / SWEEP_S) + 1
    # Only the sweeps read: the start entries came with their rings too (after "0-0").
    assert sum(keys_read) <= sweeps * len(asked), keys_read


async def test_one_ring_carries_several_entries_of_an_answer(
    make_settings: Callable[..., Settings], redis: Redis, keys_read: list[int]
) -> None:
    """A write of several numbered entries of one answer in one call (a fast model's
    chunks queued while the last write was on its way) carries them all in its ring, in
    order: no read of the answer."""
    async with running_relay(make_settings()) as h:
        relay, store = h.relay, h.store
        asked = await store.ask("t", "several")
        epoch, _ = await store.begin_answer(asked.id)
        request = QuestionRequest(asked.id, "t", "several", "")
        first = await store.start(request, Entry(EntryType.START), {}, epoch, entry_id="5-0")
        viewer = h.spawn(collect(relay, asked.id))
        await wait_for(lambda: relay.watched == 1)
        await asyncio.sleep(0.2)  # the join's read is over
        keys_read.clear()
        puts, prev = [], first
        for n in range(7):
            entry = Entry(EntryType.END) if n == 6 else Entry(EntryType.CHUNK, f"ü{n} ")
            entry_id = next_entry_id(prev, 5)
            puts.append(Put(asked.id, entry, epoch, entry_id, prev))
            prev = entry_id
        async with asyncio.timeout(TIMEOUT_S):
            done = await store.write_batch(puts)
            got = await viewer
    assert [d.entry_id for d in done] == [p.entry_id for p in puts]
    assert ids_of(got) == [first, *(p.entry_id for p in puts)]
    assert [e.text for e in got[1:]] == [p.entry.text for p in puts]
    assert keys_read == [], "an entry the ring carried was read from the stream"


def _ring(*answers: tuple[str, str, list[tuple[str, str, str]]]) -> bytes:
    """A doorbell message as store/answers.py's _RING publishes it: per answer, its key
    alone (nothing carried), or its key, the id before its entries and each entry's id,
    type and data; JSON."""
    return orjson.dumps(
        [
            [key, after, *(x for entry in entries for x in entry)] if entries else [key]
            for key, after, entries in answers
        ]
    )


async def test_a_carried_entry_after_a_gap_is_read_from_the_stream_instead(
    make_settings: Callable[..., Settings],
) -> None:
    """A ring whose entries do not follow on from the relay's cursor (a ring missed while
    the doorbell's connection was down, or a failover lost entries) is not taken: the
    answer is read from its cursor instead, so the entries in the gap are not skipped."""
    settings = make_settings()
    store = make_store(settings, pooled_client(settings.redis_url or "", size=2, name="gap"))
    relay = Relay(store, Redis(), block_ms=1000, buffer_limit=100)  # never started
    reader = relay._single
    assert reader is not None
    key, other = store.keys.answer("gap"), store.keys.answer("not-here")
    sub = Subscription(key, 100)
    relay._subs[key] = {sub}
    reader.read.set(key, "5-0")
    reader._rang(
        _ring((other, "1-0", [("2-0", "chunk", "x")]), (key, "5-0", [("6-0", "chunk", "a b")]))
    )
    assert [(e.entry_id, e.text) for e in sub.buffer] == [("6-0", "a b")]
    assert (
        reader.read.cursors[key] == "6-0" and not reader._due and other not in reader.read.cursors
    )
    reader._rang(_ring((key, "", [])))  # an entry not carried (6-1, say): due
    assert key in reader._due and reader._due_now.is_set()
    reader._rang(_ring((key, "6-1", [("7-0", "chunk", "b"), ("7-1", "chunk", "ç")])))
    assert len(sub.buffer) == 1 and reader.read.cursors[key] == "6-0", "taken past a gap"
    reader._due.clear()
    reader._rang(_ring((key, "6-0", [("7-0", "chunk", "b"), ("7-1", "end", "{}")])))
    assert [e.entry_id for e in sub.buffer] == ["6-0", "7-0", "7-1"] and not reader._due
    assert [e.type for e in sub.buffer][-1] is EntryType.END
    # Not a ring (an older version's netstrings, anything else): every answer is due.
    for unreadable in (b"5:abcde", b'{"a": 1}', b"[1]", b"[[[1]]]", b"[[]]"):
        reader._due.clear()
        reader._rang(unreadable)
        assert reader._due == {key}, unreadable
    await store.redis.aclose()


@pytest.mark.parametrize("seed", range(3))
async def test_carried_and_read_entries_mixed_are_each_delivered_once_in_order(
    make_settings: Callable[..., Settings], redis: Redis, seed: int
) -> None:
    """Numbered entries (carried by their rings) and un-numbered ones (only rung: read from
    the stream) of one answer, interleaved: a carried entry is taken only when it follows on
    from the cursor, so none is skipped or doubled, whatever the timing."""
    rng = random.Random(seed)
    async with running_relay(make_settings()) as h:
        relay, store = h.relay, h.store
        for n in range(3):
            h.spawn(collect(relay, f"idle{n}"))
        asked = await store.ask("t", "mixed")
        viewers = [h.spawn(collect(relay, asked.id)) for _ in range(2)]
        await wait_for(lambda: relay.watched == 4)
        texts = [f"{n} " for n in range(40)]
        async with asyncio.timeout(TIMEOUT_S):
            ids = await _numbered_answer(
                store,
                asked.id,
                texts,
                every_s=rng.choice([0, 0.001, 0.003]),
                unnumbered_every=rng.choice([2, 3, 5]),
            )
            got = await asyncio.gather(*viewers)
    for one in got:
        assert ids_of(one) == ids


async def test_an_unnumbered_entry_between_numbered_writes_is_not_skipped(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    """An entry whose id Redis chose, after a worker's numbered entry: the worker's next
    entry's ring names it as the one before, not the worker's previous entry, so a gateway
    whose cursor stands at the worker's entry never jumps over it."""
    async with running_relay(make_settings()) as h:
        relay, store = h.relay, h.store
        asked = await store.ask("t", "un-numbered, between")
        got: list[Entry] = []

        async def follow() -> None:
            async for entry in relay.follow(asked.id):
                got.append(entry)

        viewer = h.spawn(follow())
        await wait_for(lambda: relay.watched == 1)
        writer = ChunkWriter(store)
        writer.start()
        try:
            epoch, after = await store.begin_answer(asked.id)
            box = writer.outbox(asked.id, epoch, after)
            box.put(Entry(EntryType.START))
            await box.drain()
            await wait_for(lambda: len(got) == 1)  # the shared read's cursor is at the start
            await store.append(asked.id, Entry(EntryType.CHUNK, "un-numbered "), epoch)
            await asyncio.sleep(0.002)  # the worker's next id is past it
            box.put(Entry(EntryType.CHUNK, "numbered "))
            await box.drain()
            end = box.number(Entry(EntryType.END))
            await store.finish(
                asked.id, end.entry, {}, None, epoch=epoch, entry_id=end.entry_id, after=end.after
            )
        finally:
            await writer.stop()
        ids = [e.entry_id for e in await store.read_all(asked.id)]
        # Well within SWEEP_S: nothing waits for the sweep.
        async with asyncio.timeout(SWEEP_S / 2):
            await viewer
    assert len(ids) == 4
    assert ids_of(got) == ids


async def test_an_entry_written_without_a_ring_still_comes(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    """An entry added without ringing the doorbell (an older worker, an XADD by hand) is
    not lost: the sweep reads every relayed answer at least every SWEEP_S."""
    async with running_relay(make_settings()) as h:
        relay, store = h.relay, h.store
        for n in range(3):
            h.spawn(collect(relay, f"idle{n}"))
        viewer = h.spawn(collect(relay, "unrung"))
        await wait_for(lambda: relay.watched == 4)
        await asyncio.sleep(0.2)
        key = store.keys.answer("unrung")
        ids = [
            str(await redis.xadd(key, Entry(kind, text).fields()))  # type: ignore[arg-type]
            for kind, text in [(EntryType.CHUNK, "by hand"), (EntryType.END, "")]
        ]
        async with asyncio.timeout(SWEEP_S + TIMEOUT_S / 10):
            got = await viewer
    assert ids_of(got) == ids


async def test_the_reader_reconnects_after_its_connection_is_killed(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    async with running_relay(make_settings()) as h:
        relay, store, name = h.relay, h.store, h.reader_name
        qid = "killed"
        viewer = h.spawn(collect(relay, qid))
        await wait_for(lambda: relay.watched == 1)
        producing = h.spawn(produce(store, qid, 200, every_s=0.002))
        await asyncio.sleep(0.1)
        clients: Any = await redis.client_list()
        (reader_id,) = [c["id"] for c in clients if c.get("name") == name]
        assert await redis.client_kill_filter(_id=reader_id) == 1
        async with asyncio.timeout(TIMEOUT_S):
            ids = await producing
            got = await viewer
    assert ids_of(got) == ids


async def test_rings_lost_while_the_doorbell_reconnects_again_and_again_are_read(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    """The doorbell's connection cut every few milliseconds while three answers are written
    as a worker writes them (numbered, their entries carried by the rings): the rings sent
    while it was down are gone, yet every viewer gets every entry once, in order (read from
    its cursor once the listener is subscribed again, or taken from a later ring that
    follows on)."""
    async with running_relay(make_settings()) as h:
        relay, store, name = h.relay, h.store, h.reader_name
        asked = [await store.ask("t", f"cut {n}") for n in range(3)]
        viewers = {a.id: [h.spawn(collect(relay, a.id)) for _ in range(2)] for a in asked}
        await wait_for(lambda: relay.watched == len(asked))
        texts = [f"{n} " for n in range(400)]
        writing = [h.spawn(_numbered_answer(store, a.id, texts, every_s=0.001)) for a in asked]
        cuts = 0
        while not all(task.done() for task in writing):
            clients: Any = await redis.client_list()
            ids = [c["id"] for c in clients if c.get("name") == name]
            for reader_id in ids:
                cuts += await redis.client_kill_filter(_id=reader_id)
            await asyncio.sleep(0.02)
        async with asyncio.timeout(TIMEOUT_S):
            produced = [await task for task in writing]
            for a, ids in zip(asked, produced, strict=True):
                for task in viewers[a.id]:
                    assert ids_of(await task) == ids
    assert cuts >= 5, cuts


async def test_a_quiet_doorbell_connection_is_pinged_not_dropped(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    """The doorbell's connection only listens; with nothing written for a block's time the
    sweep pings it, so its read (which outlasts a block by a margin) is not cut: the same
    connection stays subscribed, and an entry written after the quiet still comes."""
    async with running_relay(make_settings(block_ms=100)) as h:
        relay, store, name = h.relay, h.store, h.reader_name
        viewer = h.spawn(collect(relay, "quiet"))
        await wait_for(lambda: relay.watched == 1)

        async def reader() -> dict[str, Any]:
            clients: Any = await redis.client_list()
            return next((dict(c) for c in clients if c.get("name") == name), {})

        deadline = asyncio.get_running_loop().time() + 4 * SWEEP_S
        while (first := await reader()).get("sub") != "1":
            assert asyncio.get_running_loop().time() < deadline, first
            await asyncio.sleep(0.01)
        while (now := await reader()).get("cmd") != "ping":
            assert asyncio.get_running_loop().time() < deadline, now
            await asyncio.sleep(0.05)
        assert now["id"] == first["id"] and now["sub"] == "1", (first, now)
        async with asyncio.timeout(TIMEOUT_S):
            ids = await produce(store, "quiet", 2)
            assert ids_of(await viewer) == ids


async def test_a_doorbell_connection_gone_silent_is_dropped_and_opened_again(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The doorbell's connection on a network path that swallows everything (no close, no
    reset): the sweep's PING gets no reply, and once nothing came for a block and its
    margin the listener drops the connection and opens it again; the entries written
    while it was deaf come all the same, once each, in order."""
    monkeypatch.setattr(relay_module, "BLOCK_MARGIN_S", 0.5)
    settings = make_settings(block_ms=200)
    assert settings.redis_url is not None
    db = settings.redis_url.rsplit("/", 1)[-1]
    async with CuttingProxy(settings.redis_url) as proxy:
        reader = dedicated_client(
            f"redis://127.0.0.1:{proxy.port}/{db}", name="relay-test-silent", block_ms=200
        )
        pool = pooled_client(settings.redis_url, size=4, name="relay-test-silent-pool")
        store = make_store(settings, pool)
        relay = Relay(store, reader, block_ms=200, buffer_limit=1000)
        relay.start()
        try:
            viewer = asyncio.create_task(collect(relay, "silent"))
            await wait_for(lambda: relay.watched == 1)
            # Subscribed, not only connected: a freeze during redis-py's handshake is cut by
            # the client's socket timeout (the block and connection.BLOCK_MARGIN_S), not
            # by the doorbell's own watch, which this test is about.
            async with asyncio.timeout(TIMEOUT_S):
                while (await pool.pubsub_numsub(store.keys.written))[0][1] < 1:
                    await asyncio.sleep(0.01)
            assert proxy.connections == 1
            proxy.frozen = True
            started = asyncio.get_running_loop().time()
            ids = [
                await store.append("silent", Entry(EntryType.START)),
                await store.append("silent", Entry(EntryType.CHUNK, "written while deaf ")),
            ]
            await wait_for(lambda: proxy.connections == 2, timeout_s=5)
            reconnected_s = asyncio.get_running_loop().time() - started
            proxy.frozen = False
            async with asyncio.timeout(TIMEOUT_S):
                ids.append(await store.append("silent", Entry(EntryType.CHUNK, "and after ")))
                ids.append(await store.append("silent", Entry(EntryType.END)))
                assert ids_of(await viewer) == ids
        finally:
            await relay.stop()
            await reader.aclose()
            await pool.aclose(close_connection_pool=True)
    assert reconnected_s < 3.0, reconnected_s  # a block, its margin and a sweep: not 10 s


@pytest.mark.parametrize("viewers", [1, 5])
async def test_a_viewer_that_leaves_drops_the_key_from_the_read(
    make_settings: Callable[..., Settings], redis: Redis, viewers: int
) -> None:
    async with running_relay(make_settings()) as h:
        relay, store = h.relay, h.store
        waiting = [h.spawn(collect(relay, "left")) for _ in range(viewers)]
        await wait_for(lambda: relay.viewers == viewers and relay.watched == 1)
        for task in waiting:
            task.cancel()  # as a disconnect cancels its watch
        await asyncio.gather(*waiting, return_exceptions=True)
        assert relay.viewers == 0 and relay.watched == 0
        # The relay goes on serving others.
        other = h.spawn(collect(relay, "other"))
        await wait_for(lambda: relay.watched == 1)
        async with asyncio.timeout(TIMEOUT_S):
            ids = await produce(store, "other", 3)
            assert ids_of(await other) == ids
