"""Batched writes: the appends of every answer a worker is generating share pipelines.

One awaited round trip per chunk makes unrelated answers wait on each other's network
latency, and makes a generation wait for Redis before it reads the model again. Instead:

- `append()` queues one entry and waits for its own result (start-up entries, tools);
- an answer's `Outbox` takes its entries without waiting: the writer sends them with
  the next pipeline, and while a pipeline is on its way, the chunks queued behind it are
  coalesced into one entry (one entry may hold several tokens; it is still delivered once,
  whole). The answer learns the outcome of its writes — the cancel flag, a fence, a
  Redis error — before its next entry and, at the end, from `drain()`.

Every write is one script call that checks the answer's epoch and returns its cancel
flag, so cancellation costs no extra round trip; an outbox's writes are numbered (see
`Outbox`), so a failover neither doubles nor silently drops an entry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from tokenrelay.connection import Lane
from tokenrelay.errors import Fenced, StoreError
from tokenrelay.store import Applied, Put, Store
from tokenrelay.wire import Entry, EntryType

log = logging.getLogger(__name__)

MAX_BATCH = 2_000
# An answer's last numbered writes, kept to be written again if a failover loses them (a
# replica is behind by what the master wrote in its last moments, not by thousands).
TAIL_ENTRIES = 4_096
LOST = (
    "part of this answer was lost when Redis failed over, and this worker no longer holds it "
    "to write it again"
)
# Entries whose queued texts join into one (a tool call's pieces carry more than text).
_COALESCED = frozenset({EntryType.CHUNK, EntryType.REASONING})


@dataclass(frozen=True, slots=True)
class Appended:
    entry_id: str
    cancel_requested: bool


@dataclass(slots=True)
class _Pending:
    question_id: str
    entry: Entry
    check_cancel: bool
    epoch: int
    done: asyncio.Future[Appended]


def _fenced(question_id: str) -> Fenced:
    return Fenced(f"question {question_id}: another worker has taken over its answer")


class Outbox:
    """One answer's entries on their way to its stream, in order.

    Each entry gets its id here (as `next_entry_id` makes it) and names the one before it,
    so a write sent twice is applied once, and a stream that lost acknowledged entries in a
    failover says so: the outbox then writes them again, with their own ids, from the last
    TAIL_ENTRIES it keeps (a viewer that saw one keeps its place; one that did not gets
    it), or gives up (`lost`) and the answer ends with an `error` entry."""

    def __init__(self, writer: ChunkWriter, question_id: str, epoch: int, after: str = "") -> None:
        self.question_id = question_id
        self.epoch = epoch
        self.last_id = after  # the id of the answer's newest entry, written or on its way
        ms, _, seq = after.partition("-")
        self._ms, self._seq = (int(ms), int(seq)) if after else (-1, 0)  # last_id's parts
        self.cancel_requested = False
        self.lost = False  # the stream lost entries this outbox no longer holds
        self.written = 0  # entries written so far
        self._writer = writer
        self._entries: list[Entry] = []  # not sent yet
        self._again: list[Put] = []  # lost in a failover: to be written again, first
        self._tail: deque[Put] = deque(maxlen=TAIL_ENTRIES)  # the last numbered writes
        self._failure: BaseException | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def put(self, entry: Entry) -> None:
        """Queue `entry` (raising what an earlier write of this answer ran into)."""
        self.check()
        if self._entries and entry.type in _COALESCED:
            last = self._entries[-1]
            if last.type is entry.type:  # behind: one entry for the queued tokens
                self._entries[-1] = Entry(entry.type, last.text + entry.text)
                return
        self._entries.append(entry)
        self._idle.clear()
        self._writer._ready(self)

    def number(self, entry: Entry) -> Put:
        """`entry` as the answer's next numbered write (kept for a re-send): its id is
        `next_entry_id(self.last_id, now)`, without parsing the last one again."""
        now = time.time_ns() // 1_000_000
        if now > self._ms:
            self._ms, self._seq = now, 0
        else:
            self._seq += 1
        put = Put(self.question_id, entry, self.epoch, f"{self._ms}-{self._seq}", self.last_id)
        self.last_id = put.entry_id
        self._tail.append(put)
        return put

    def check(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def drain(self) -> None:
        """Wait until every queued entry is written; raise what a write ran into."""
        await self._idle.wait()
        self.check()

    def rewind(self, last_id: str) -> None:
        """The stream ends at `last_id`: write again what this outbox wrote after it (also
        after a failed write: its entries are numbered, and the terminal entry must follow
        them)."""
        if self.lost or isinstance(self._failure, Fenced):
            return
        tail = list(self._tail)
        at = next((i for i, put in enumerate(tail) if put.after == last_id), None)
        if at is None:
            self.lost = True
            self._failed(StoreError(f"question {self.question_id}: {LOST}"))
            return
        log.warning(
            "question %s: its stream ends at %s, %d entries before this worker's last "
            "(a failover lost them); writing them again",
            self.question_id,
            last_id or "its start",
            len(tail) - at,
        )
        self._again = tail[at:]
        self._failure = None  # what failed is being written again
        self._idle.clear()
        self._writer._ready(self)

    def _take(self) -> list[Put]:
        taken, self._again = self._again, []
        taken += [self.number(entry) for entry in self._entries]
        self._entries = []
        return taken

    def _sent(self, results: list[Applied]) -> None:
        behind: str | None = None
        for done in results:
            if done.entry_id is not None:
                self.written += 1
                self.cancel_requested = self.cancel_requested or done.cancel
            elif done.refused:
                self.lost = True
                self._failure = self._failure or StoreError(f"question {self.question_id}: {LOST}")
            elif done.behind is not None:
                behind = done.behind if behind is None else behind
            else:
                self._failure = self._failure or _fenced(self.question_id)
        if behind is not None:
            self.rewind(behind)
        self._settle()

    def _failed(self, error: BaseException) -> None:
        self._failure = self._failure or error
        self._entries.clear()
        self._again.clear()
        self._settle()

    def _settle(self) -> None:
        if self._failure is not None:
            self._entries.clear()
            self._again.clear()
        if not self._entries and not self._again:
            self._idle.set()
        else:
            self._writer._ready(self)


@dataclass(slots=True)
class _Batch:
    """One round trip's writes: queued appends first, then what ready outboxes held."""

    appends: list[_Pending]
    boxes: list[tuple[Outbox, int]]  # each with the number of its writes
    writes: list[Put]


class ChunkWriter:
    """Sends the writes of every answer of this worker, a batch at a time.

    On a single node no task stands between an answer and its connection: what a turn of
    the loop makes ready (the answers' `put`s, `append`s) is packed and written to the
    lane's connection by a callback right after that turn, and the reply is handed out in
    the I/O callback (`Lane.start`), which begins the next batch with whatever queued
    meanwhile. Woken through the writer's task, redis-py's retry, the lane's lock and
    timeout, a chunk spent ~330 us in the worker from the model's read to Redis's write at
    one answer (traced, docs/performance.md). A batch that fails there, or meets Redis
    without its script, is sent again by the writer's task with the store's retries; in a
    cluster every batch goes that way (`Store.write_batch`)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: list[_Pending] = []
        self._boxes: dict[Outbox, None] = {}  # outboxes with entries to send, in order
        self._sending: _Batch | None = None  # on its way
        self._again: _Batch | None = None  # for the task to send (see `_run`)
        self._due = False  # `_send_due` is called soon
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lane: Lane | None = None  # its own connection (single node), see connect()
        # Kept once started: asyncio.get_running_loop() is a getpid() system call on 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.written = 0

    def start(self) -> None:
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._lane = self._store.lane()
            self._task = asyncio.create_task(self._run(), name="tokenrelay-chunk-writer")
            if self._queue or self._boxes:  # queued before the start
                self._send_soon()

    async def connect(self) -> None:
        """Start, with the writer's own connection (single node) open already."""
        self.start()
        if self._lane is not None:
            await self._lane.open()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        stopping = StoreError("the worker is stopping")
        batches = [b for b in (self._sending, self._again) if b is not None]
        self._sending = self._again = None
        for batch in batches:
            self._failed(batch, stopping)
        for pending in self._queue:
            if not pending.done.done():
                pending.done.cancel()
        self._queue.clear()
        for box in self._boxes:
            box._failed(stopping)
        self._boxes.clear()
        lane, self._lane = self._lane, None
        if lane is not None:
            await lane.aclose()

    def outbox(self, question_id: str, epoch: int, after: str = "") -> Outbox:
        """An outbox for one delivery of an answer whose stream ends at `after` (see
        `Store.begin_answer`)."""
        return Outbox(self, question_id, epoch, after)

    async def append(
        self, question_id: str, entry: Entry, *, check_cancel: bool = True, epoch: int = 0
    ) -> Appended:
        """Write `entry` if `epoch` is still the answer's (else raise Fenced); with
        `check_cancel`, also report the answer's cancel flag (else the result says not
        cancelled)."""
        done: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(question_id, entry, check_cancel, epoch, done))
        self._send_soon()
        return await done

    def _ready(self, box: Outbox) -> None:
        self._boxes[box] = None
        self._send_soon()

    def _send_soon(self) -> None:
        """Begin a batch once this turn of the loop is over (what else it makes ready goes
        with it), unless one is due or on its way already."""
        if not self._due and self._sending is None:
            self._due = True
            (self._loop or asyncio.get_running_loop()).call_soon(self._send_due)

    def _send_due(self) -> None:
        self._due = False
        self._send_next()

    def _send_next(self) -> None:
        """Begin the next batch now, unless one is on its way (its end begins the next)."""
        if self._sending is not None or self._task is None or not (self._queue or self._boxes):
            return
        batch = self._sending = self._gather()
        sent = None
        if self._lane is not None and self._lane.ready:
            payload, calls = self._store.packed_writes(batch.writes)
            sent = self._lane.start(payload, calls)
        if sent is None:  # not open yet (or again), or a cluster: the task sends it
            self._again = batch
            self._wake.set()
        else:
            sent.add_done_callback(self._landed)

    def _landed(self, sent: asyncio.Future[list[Any]]) -> None:
        """The reply to a batch `_send_next` began (in the I/O callback's wake)."""
        batch = self._sending
        if batch is None or self._task is None:  # stopped meanwhile
            return
        replies = None if sent.cancelled() or sent.exception() else sent.result()
        if replies is None or any(isinstance(reply, Exception) for reply in replies):
            self._again = batch  # the task sends it again (retries, scripts, the error)
            self._wake.set()
            return
        try:
            results = self._store.applied(batch.writes, replies)
        except Exception as e:  # replies not shaped as the script's: as a failed batch
            log.exception("a batch of writes came back unreadable")
            self._given_up(batch, e)
            return
        self._done(batch, results)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (batch := self._again) is not None:
                self._again = None
                try:
                    results = await self._store.write_batch(batch.writes, self._lane)
                except Exception as e:  # handed to each writer of the batch: it ends its answer
                    self._given_up(batch, e)
                else:
                    self._done(batch, results)

    def _gather(self) -> _Batch:
        """The next batch: queued appends first, then what the ready outboxes hold."""
        appends, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        room = MAX_BATCH - len(appends)
        boxes: list[tuple[Outbox, int]] = []
        writes = [
            Put(p.question_id, p.entry, p.epoch, check_cancel=p.check_cancel) for p in appends
        ]
        while self._boxes and room > 0:
            box = next(iter(self._boxes))
            del self._boxes[box]
            taken = box._take()
            boxes.append((box, len(taken)))
            writes += taken
            room -= len(taken)
        return _Batch(appends, boxes, writes)

    def _done(self, batch: _Batch, results: list[Applied]) -> None:
        """Hand each write's outcome to its writer, then begin the next batch (not before:
        an outbox that is given its outcome must have nothing else on its way)."""
        self.batches += 1
        self.written += len(batch.writes)
        for p, done in zip(batch.appends, results, strict=False):
            if p.done.done():
                continue
            if done.entry_id is None:
                p.done.set_exception(_fenced(p.question_id))
            else:
                p.done.set_result(Appended(done.entry_id, done.cancel))
        at = len(batch.appends)
        for box, sent in batch.boxes:
            box._sent(results[at : at + sent])
            at += sent
        self._sending = None
        self._send_next()

    def _given_up(self, batch: _Batch, error: BaseException) -> None:
        """The batch on its way failed for good: its writers are told, the next begins."""
        self._failed(batch, error)
        self._sending = None
        self._send_next()

    @staticmethod
    def _failed(batch: _Batch, error: BaseException) -> None:
        for p in batch.appends:
            if not p.done.done():
                p.done.set_exception(error)
        for box, _ in batch.boxes:
            box._failed(error)
