"""Batched chunk writes: the XADDs of every answer a worker is generating share pipelines.

One awaited round trip per chunk makes unrelated answers wait on each other's
network latency; instead each chunk joins the next pipeline, which also reads
the answer's cancel flag when the generation asks for it, so cancellation costs
no extra round trip (and, asked for every few chunks, not one HGET per chunk).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from tokenrelay.errors import Fenced
from tokenrelay.store import Store
from tokenrelay.wire import Entry

log = logging.getLogger(__name__)

MAX_BATCH = 2_000


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


class ChunkWriter:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.written = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tokenrelay-chunk-writer")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for pending in self._queue:
            if not pending.done.done():
                pending.done.cancel()
        self._queue.clear()

    async def append(
        self, question_id: str, entry: Entry, *, check_cancel: bool = True, epoch: int = 0
    ) -> Appended:
        """Write `entry` if `epoch` is still the answer's (else raise Fenced); with
        `check_cancel`, also read the answer's cancel flag (else the result says not
        cancelled)."""
        done: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(question_id, entry, check_cancel, epoch, done))
        self._wake.set()
        return await done

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                await self._flush(batch)

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            results = await self._store.append_batch(
                [(p.question_id, p.entry, p.check_cancel, p.epoch) for p in batch]
            )
        except Exception as e:  # handed to each waiting generation, which ends its answer
            for p in batch:
                if not p.done.done():
                    p.done.set_exception(e)
            return
        self.batches += 1
        self.written += len(batch)
        for p, (entry_id, cancel) in zip(batch, results, strict=True):
            if p.done.done():
                continue
            if entry_id is None:
                p.done.set_exception(
                    Fenced(f"question {p.question_id}: another worker has taken over its answer")
                )
            else:
                p.done.set_result(Appended(entry_id, cancel))
