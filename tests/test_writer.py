"""ChunkWriter against a real Valkey: appends share pipelines, cancel flags read on demand,
a Redis failure reaches every waiting append; a write sent again is applied once, and
entries a failover lost are written again."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from tests.conftest import running_gateway
from tests.support.failover import lose_last_entries
from tests.support.proxy import CuttingProxy
from tests.support.sockets import wait_for
from tests.support.sse import Event, events
from tokenrelay import connection as connection_module
from tokenrelay.errors import Fenced, StoreError
from tokenrelay.providers.base import Finish, Prompt
from tokenrelay.providers.guard import Timeouts
from tokenrelay.services import make_store
from tokenrelay.settings import Settings
from tokenrelay.store import Store, answer_text
from tokenrelay.wire import Entry, EntryType, QuestionRequest, Status
from tokenrelay.worker import Answer, ChunkWriter, Generator
from tokenrelay.worker import writer as writer_module
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
    """A batch's writes share a script call that checks each one's epoch and reads its
    answer's cancel flag in the same round trip (so reading it costs no extra command); the
    flag is reported only to writes that asked for it."""
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
    # 50 writes queued at once: one batch, one call (a second if the writer woke between).
    assert 1 <= scripts <= 2, f"{scripts} script calls for one batch of 50 writes"
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


async def test_what_was_queued_before_the_start_is_written_at_the_start(store: Store) -> None:
    writer = ChunkWriter(store)
    waiting = asyncio.create_task(writer.append("early", Entry(EntryType.CHUNK, "x")))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    writer.start()
    try:
        async with asyncio.timeout(5):
            written = await waiting
        assert [e.entry_id for e in await store.read("early")] == [written.entry_id]
    finally:
        await writer.stop()


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
    box = writer.outbox(asked.id, *(await store.begin_answer(asked.id)))
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


async def test_the_chunks_of_one_turn_reach_redis_together_by_the_next(
    store: Store, redis_url: str
) -> None:
    """What one turn of the loop puts (here three answers' chunks) goes to Redis in one
    batch, written by the next turn: no task's wake-up between the model's chunk and its
    write. Seen by another client while this loop is held after that one turn."""
    writer = ChunkWriter(store)
    await writer.connect()
    reader = SyncRedis.from_url(redis_url, decode_responses=True)
    try:
        boxes = []
        for n in range(3):
            asked = await store.ask("t", f"q{n}")
            boxes.append(writer.outbox(asked.id, *(await store.begin_answer(asked.id))))
        keys = [store.keys.answer(box.question_id) for box in boxes]
        batches = writer.batches
        for box in boxes:
            box.put(Entry(EntryType.CHUNK, "at once "))
        await asyncio.sleep(0)  # one turn
        until = time.monotonic() + 2
        while (now := [reader.xlen(k) for k in keys]) != [1, 1, 1] and time.monotonic() < until:
            time.sleep(0.001)  # noqa: ASYNC251 (holds the loop: no task of this process runs)
        assert now == [1, 1, 1], "a chunk waited for a later turn of the loop"
        for box in boxes:
            await box.drain()
        assert writer.batches == batches + 1
    finally:
        reader.close()
        await writer.stop()


async def test_a_write_whose_reply_never_comes_is_sent_again(
    make_settings: Callable[..., Settings], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The network path to Redis goes silent while a batch is on its way (no close, no
    reset): the batch's deadline ends that connection and the writer sends it again on a
    new one; the answer holds the entry once."""
    monkeypatch.setattr(connection_module, "LANE_TIMEOUT_S", 0.5)
    async with CuttingProxy(make_settings().redis_url or "") as proxy:
        client = Redis.from_url(f"redis://127.0.0.1:{proxy.port}/0", decode_responses=True)
        store = make_store(make_settings(), client)
        writer = ChunkWriter(store)
        await writer.connect()
        try:
            asked = await store.ask("t", "q")
            box = writer.outbox(asked.id, *(await store.begin_answer(asked.id)))
            box.put(Entry(EntryType.CHUNK, "before "))
            await box.drain()
            opened = proxy.connections
            proxy.freeze_open()
            started = asyncio.get_running_loop().time()
            box.put(Entry(EntryType.CHUNK, "unheard "))
            await wait_for(lambda: proxy.connections > opened, timeout_s=5)
            waited_s = asyncio.get_running_loop().time() - started
            async with asyncio.timeout(10):
                await box.drain()
        finally:
            await writer.stop()
            await client.aclose()
    assert 0.4 <= waited_s < 2.0, waited_s
    texts = [e.text for e in await make_store(make_settings(), redis).read_all(asked.id)]
    assert texts == ["before ", "unheard "]


async def test_an_outbox_of_an_old_epoch_is_fenced(store: Store, writer: ChunkWriter) -> None:
    asked = await store.ask("t", "q")
    old = writer.outbox(asked.id, *(await store.begin_answer(asked.id)))
    old.put(Entry(EntryType.CHUNK, "mine "))
    await old.drain()
    new = writer.outbox(
        asked.id, *(await store.begin_answer(asked.id))
    )  # another delivery took over
    old.put(Entry(EntryType.CHUNK, "too late"))
    with pytest.raises(Fenced):
        await old.drain()
    with pytest.raises(Fenced):
        old.put(Entry(EntryType.CHUNK, "again"))
    new.put(Entry(EntryType.CHUNK, "theirs"))
    await new.drain()
    assert [e.text for e in await store.read_all(asked.id)] == ["mine ", "theirs"]


async def test_an_outbox_writes_again_what_a_failover_lost(
    store: Store, writer: ChunkWriter, redis: Redis
) -> None:
    """The master acknowledged entries its replica never got, and the replica took over:
    the outbox's next write learns where the stream ends, and the lost entries are written
    again with their own ids, so a viewer that saw them keeps its place and one that did
    not gets them; the text is whole, each piece once."""
    asked = await store.ask("t", "q")
    box = writer.outbox(asked.id, *(await store.begin_answer(asked.id)))
    for i in range(10):
        box.put(Entry(EntryType.CHUNK, f"{i} "))
        await box.drain()  # one entry each
    seen = await store.read_all(asked.id)  # what a viewer had from the old master
    stream, record = store.keys.answer(asked.id), store.keys.question(asked.id)
    dropped = await lose_last_entries(redis, stream, record, 3)
    assert dropped == [e.entry_id for e in seen[-3:]]
    for i in range(10, 15):
        box.put(Entry(EntryType.CHUNK, f"{i} "))
        await box.drain()
    entries = await store.read_all(asked.id)
    assert "".join(e.text for e in entries) == "".join(f"{i} " for i in range(15))
    assert [e.entry_id for e in entries[:10]] == [e.entry_id for e in seen]
    after_seen = await store.read_all(asked.id, seen[-1].entry_id)
    assert "".join(e.text for e in after_seen) == "".join(f"{i} " for i in range(10, 15))
    assert not box.lost


async def test_an_outbox_that_no_longer_holds_what_was_lost_gives_up(
    store: Store, writer: ChunkWriter, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "TAIL_ENTRIES", 2)
    asked = await store.ask("t", "q")
    box = writer.outbox(asked.id, *(await store.begin_answer(asked.id)))
    for i in range(6):
        box.put(Entry(EntryType.CHUNK, f"{i} "))
        await box.drain()
    await lose_last_entries(redis, store.keys.answer(asked.id), store.keys.question(asked.id), 3)
    box.put(Entry(EntryType.CHUNK, "6 "))
    with pytest.raises(StoreError, match="lost"):
        await box.drain()
    assert box.lost
    assert len(await store.read_all(asked.id)) == 3, "nothing written past the gap"


async def test_an_answer_that_lost_entries_in_a_failover_ends_whole_for_every_viewer(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    """The whole path: a worker streams an answer to two SSE viewers; mid-answer the stream
    loses its last entries as a failed-over replica would. Every viewer, and one that reads
    it afterwards, gets the model's text exactly once, no entry twice, then `end`."""
    text = " ".join(f"w{n}" for n in range(40))
    settings = make_settings(scripted_text=text, scripted_rate=20.0)
    keys = make_store(settings, redis).keys
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        qid = (await client.post("/api/questions", json={"question": "failover"})).json()["id"]
        path = f"/api/questions/{qid}/events"
        viewers = [asyncio.create_task(_all_events(client, path)) for _ in range(2)]
        async with asyncio.timeout(30):
            while await redis.xlen(keys.answer(qid)) < 12:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)  # the viewers have had them
        dropped = await lose_last_entries(redis, keys.answer(qid), keys.question(qid), 3)
        async with asyncio.timeout(30):
            seen = await asyncio.gather(*viewers)
        seen.append(await _all_events(client, path))
    ids = [e.entry_id for e in await make_store(settings, redis).read_all(qid)]
    assert set(dropped) <= set(ids), "the lost entries were not written again with their ids"
    for viewer in seen:
        assert viewer[-1].event == "end"
        got = [e.id for e in viewer]
        assert len(got) == len(set(got)), "an entry was delivered twice"
        assert "".join(e.data["text"] for e in viewer if e.event == "chunk") == text


async def test_a_write_whose_reply_was_lost_is_not_doubled(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    """Redis ran a pipeline of appends but the connection broke before the reply came back
    (a proxy drops it); the client sends the pipeline again, as the cluster client does
    after a failover (here a single-node client told to retry). The answer holds each
    entry once."""
    async with _ReplyDropper(make_settings().redis_url or "") as proxy:
        client = Redis.from_url(
            proxy.url,
            decode_responses=True,
            retry=Retry(NoBackoff(), 3),
            retry_on_error=[RedisConnectionError],
        )
        store = make_store(make_settings(), client)
        writer = ChunkWriter(store)
        writer.start()
        try:
            asked = await store.ask("t", "q")
            box = writer.outbox(asked.id, *(await store.begin_answer(asked.id)))
            for i in range(8):
                if i == 4:
                    proxy.drop_next_reply()
                box.put(Entry(EntryType.CHUNK, f"{i} "))
                await box.drain()
        finally:
            await writer.stop()
            await client.aclose()
    assert proxy.dropped == 1
    entries = await make_store(make_settings(), redis).read_all(asked.id)
    assert [e.text for e in entries] == [f"{i} " for i in range(8)]


@pytest.mark.parametrize("tail", [64, 2])
async def test_an_answer_whose_end_finds_the_stream_behind(
    store: Store, writer: ChunkWriter, redis: Redis, monkeypatch: pytest.MonkeyPatch, tail: int
) -> None:
    """The loss shows only at the terminal write (the model had said everything): the
    `end` is refused, the lost entries are written again, then `end` — or, when the worker
    no longer holds them, the answer ends with an `error` entry that says so."""
    monkeypatch.setattr(writer_module, "TAIL_ENTRIES", tail)
    asked = await store.ask("t", "q")
    request = QuestionRequest(asked.id, "t", "q")
    model = _GatedModel([f"{n} " for n in range(8)])
    gen = Generator(store, writer, model, Timeouts(5, 5))
    answering = asyncio.create_task(Answer(store, request, None).run(gen))
    await asyncio.wait_for(model.said_all.wait(), 10)
    await asyncio.sleep(0.1)  # the last chunk written
    await lose_last_entries(redis, store.keys.answer(asked.id), store.keys.question(asked.id), 3)
    model.finish.set()
    status = await asyncio.wait_for(answering, 10)
    entries = await store.read_all(asked.id)
    if tail > 3:
        assert status is Status.DONE and entries[-1].type is EntryType.END
        assert answer_text(entries) == "".join(f"{n} " for n in range(8))
    else:
        assert status is Status.FAILED and entries[-1].type is EntryType.ERROR
        assert entries[-1].meta["kind"] == "lost" and "failed over" in entries[-1].text
    assert [e.type for e in entries].count(entries[-1].type) == 1


@pytest.mark.parametrize("drops", [1, 2])
async def test_a_batch_that_never_reached_redis_is_written_before_the_end(
    make_settings: Callable[..., Settings], redis: Redis, drops: int
) -> None:
    """A batch of appends is lost on the way to Redis (the connection cut before it got
    there). The writer sends it once more on a new connection: cut once, the answer ends
    whole. Cut again, the answer stops with an error, and its terminal write, finding the
    stream behind, has the lost entries written first: the text the model gave up to there,
    each piece once, then one `error`."""
    pieces = [f"{n} " for n in range(12)]
    async with _ReplyDropper(make_settings().redis_url or "") as proxy:
        client = Redis.from_url(proxy.url, decode_responses=True)  # no retries
        store = make_store(make_settings(), client)
        writer = ChunkWriter(store)
        writer.start()
        try:
            asked = await store.ask("t", "q")
            request = QuestionRequest(asked.id, "t", "q")
            drop = functools.partial(proxy.drop_next_request, drops)
            model = _GatedModel(pieces, before={4: drop})
            model.finish.set()
            gen = Generator(store, writer, model, Timeouts(5, 5))
            status = await asyncio.wait_for(Answer(store, request, None).run(gen), 30)
        finally:
            await writer.stop()
            await client.aclose()
    assert proxy.dropped == drops
    entries = await make_store(make_settings(), redis).read_all(asked.id)
    text = answer_text(entries)
    if drops == 1:
        assert status is Status.DONE and entries[-1].type is EntryType.END
        assert text == "".join(pieces)
        return
    assert status is Status.FAILED and entries[-1].type is EntryType.ERROR
    assert [e.type for e in entries].count(EntryType.ERROR) == 1
    assert text in {"".join(pieces[:n]) for n in range(5, 13)}, text


# -- helpers ---------------------------------------------------------------------------


async def _all_events(client: httpx.AsyncClient, path: str) -> list[Event]:
    return [e async for e in events(client, path)]


class _GatedModel:
    """Says its pieces at once, then waits for `finish` before it ends."""

    continues = True
    name = model = "gated"

    def __init__(
        self, pieces: list[str], before: dict[int, Callable[[], None]] | None = None
    ) -> None:
        self._pieces = pieces
        self._before = before or {}
        self.said_all = asyncio.Event()
        self.finish = asyncio.Event()

    async def stream(self, prompt: Prompt) -> AsyncIterator[str | Finish]:
        for n, piece in enumerate(self._pieces):
            if n in self._before:
                self._before[n]()
            yield piece
            await asyncio.sleep(0.01)
        self.said_all.set()
        await self.finish.wait()
        yield Finish("stop", 1, len(self._pieces))

    async def aclose(self) -> None:
        return None


class _ReplyDropper:
    """A TCP proxy to Redis that can let a request through and then cut the connection
    instead of passing on its reply (the command ran, the client never hears of it), or
    cut it instead of passing on the request (the command never ran)."""

    def __init__(self, redis_url: str) -> None:
        self._port = urlsplit(redis_url).port
        self._server: asyncio.Server | None = None
        self._armed = False
        self._armed_request = 0  # requests still to drop
        self._open: set[asyncio.WriteTransport] = set()
        self.dropped = 0
        self.url = ""

    def drop_next_reply(self) -> None:
        self._armed = True

    def drop_next_request(self, times: int = 1) -> None:
        self._armed_request = times

    async def __aenter__(self) -> _ReplyDropper:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            for transport in self._open:
                transport.abort()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        self._open |= {writer.transport, up_writer.transport}
        cut = asyncio.Event()

        async def upstream() -> None:
            while data := await reader.read(65536):
                if self._armed_request and b"EVAL" in data.upper():
                    self._armed_request -= 1
                    self.dropped += 1
                    writer.transport.abort()
                    up_writer.transport.abort()
                    return
                if self._armed and b"EVAL" in data.upper():
                    self._armed = False
                    cut.set()
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if cut.is_set():
                    self.dropped += 1
                    writer.transport.abort()
                    up_writer.transport.abort()
                    return
                writer.write(data)
                await writer.drain()

        with contextlib.suppress(OSError):
            await asyncio.gather(upstream(), downstream())
        self._open -= {writer.transport, up_writer.transport}
        writer.close()
        up_writer.close()
