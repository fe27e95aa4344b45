"""The consumer-group loop: take questions, answer them, reclaim what dead workers left.

Lifecycle (staged, as saq does it): `stop()` stops taking work, lets running
answers finish within the grace period, then cancels what is left and releases
their requests: they stay pending, marked idle, so any live worker (or this one's
replacement) reclaims them on its next pass. The consumer is deleted only when
nothing is pending for it any more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from tokenrelay import metrics
from tokenrelay.connection import NodeReaders
from tokenrelay.pacing import Backoff, wait_set
from tokenrelay.providers.base import Provider
from tokenrelay.providers.guard import Timeouts
from tokenrelay.store import Store
from tokenrelay.wire import QuestionRequest
from tokenrelay.worker.answer import Answer, Generator
from tokenrelay.worker.writer import ChunkWriter

log = logging.getLogger(__name__)

HARD_DEADLINE_S = 5.0
# How often, at most, workers look for queued questions whose request was lost; one whose
# request has been gone for three reclaim idle times is failed.
SWEEP_EVERY_MAX_S = 60.0
# A provider told to stop that is still computing this long after is stuck (native code).
WEDGED_AFTER_S = 10.0
# A refused or failed XREADGROUP is tried again after this, doubling up to the most.
READ_RETRY_FIRST_S = 0.1
READ_RETRY_MOST_S = 5.0


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class Worker:
    def __init__(
        self,
        store: Store,
        reader: Redis | NodeReaders,
        provider: Provider,
        *,
        concurrency: int,
        block_ms: int,
        reclaim_idle_ms: int,
        max_deliveries: int,
        grace_period_s: float,
        timeouts: Timeouts,
        name: str | None = None,
        on_wedged: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.name = name or consumer_name()
        self._reader = reader  # a dedicated connection: XREADGROUP blocks on it; closed by stop()
        self._provider = provider
        self._concurrency = concurrency
        self._block_ms = block_ms
        self._reclaim_idle_ms = reclaim_idle_ms
        self._max_deliveries = max_deliveries
        self._grace_period_s = grace_period_s
        self._writer = ChunkWriter(store)
        self._gen = Generator(store, self._writer, provider, timeouts)
        self._on_wedged = on_wedged
        self._inflight: dict[str, asyncio.Task[Any]] = {}  # request entry id -> task
        self._slot_free = asyncio.Event()
        self._reserved = 0  # slots the blocked reads may fill
        self._hold = True  # a read's reserved slots are not free for another read
        self._reclaim_now = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        self._next_sweep = 0.0
        self.reclaimed = 0

    @property
    def busy(self) -> int:
        return len(self._inflight)

    @property
    def free(self) -> int:
        return self._concurrency - len(self._inflight)

    async def start(self) -> None:
        await self.store.ensure_group()
        await self._writer.connect()
        metrics.SLOTS.inc(self._concurrency)
        sets = self.store.group.read_sets()
        # From a random shard on: when the slots cannot arm every shard's read at once, each
        # worker arms a different part, so together they cover all of them.
        start = random.randrange(len(sets))
        sets = sets[start:] + sets[:start]
        # One blocking read per set of shards (in a cluster, per shard). One read takes every
        # free slot. Several take one request each and stay armed while any slot is free, so
        # that no shard waits for a slot another shard's idle read holds: a burst may take up
        # to (shards - 1) requests past the concurrency. (Holding slots for idle reads kept
        # questions of unarmed shards waiting ~10 s for an answer to end.)
        most = self._concurrency if len(sets) == 1 else 1
        self._hold = len(sets) == 1
        self._loops = [
            *(
                asyncio.create_task(self._read_loop(shards, most), name=f"{self.name}-read")
                for shards in sets
            ),
            asyncio.create_task(self._reclaim_loop(), name=f"{self.name}-reclaim"),
            asyncio.create_task(self._wedge_loop(), name=f"{self.name}-wedge"),
            asyncio.create_task(self._load_model(), name=f"{self.name}-load"),
        ]
        log.info(
            "worker %s started: %d slots, provider %s (%s)",
            self.name,
            self._concurrency,
            self._provider.name,
            self._provider.model,
        )

    def reclaim_soon(self) -> None:
        """Run a reclaim pass now (the supervisor released a dead worker's requests)."""
        self._reclaim_now.set()

    async def stop(self) -> None:
        """Safe to call twice."""
        if self._stopping:
            return
        self._stopping = True
        metrics.SLOTS.dec(self._concurrency)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self._drain()
        await self._writer.stop()
        await self._let_go()
        await self._reader.aclose()

    async def _drain(self) -> None:
        """Let running answers finish within the grace period; cancel the rest."""
        running = list(self._inflight.values())
        if not running:
            return
        log.info(
            "worker %s: waiting up to %gs for %d answers",
            self.name,
            self._grace_period_s,
            len(running),
        )
        _, pending = await asyncio.wait(running, timeout=self._grace_period_s)
        if pending:
            log.warning(
                "worker %s: stopping %d unfinished answers (%s); their requests are released "
                "for another worker",
                self.name,
                len(pending),
                ", ".join(t.get_name() for t in pending),
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=HARD_DEADLINE_S)

    async def _let_go(self) -> None:
        """Release what is still pending for us, and leave the group only when nothing is."""
        try:
            released = await self.store.group.release(self.name)
            if released:
                log.warning("worker %s: released %d unfinished requests", self.name, released)
            await self.store.group.forget(self.name)
        except RedisError as e:  # they stay pending for us: reclaimed after the idle time
            log.warning("worker %s: could not release its requests (%s)", self.name, e)

    # -- taking work --------------------------------------------------------

    async def _take_slots(self, most: int) -> int:
        """Reserve up to `most` free slots for one read (at least one: waits for it)."""
        while self.free - (self._reserved if self._hold else 0) <= 0:
            self._slot_free.clear()
            await self._slot_free.wait()
        count = max(1, min(most, self.free - self._reserved))
        self._reserved += count
        return count

    async def _read_loop(self, shards: list[int], most: int) -> None:
        backoff = Backoff(READ_RETRY_FIRST_S, READ_RETRY_MOST_S)
        while True:
            count = await self._take_slots(most)
            key = self.store.group.streams[shards[0]]
            try:
                reader = self._reader
                if isinstance(reader, NodeReaders):  # cluster: this shard's node
                    reader = await reader.client_for(key)
                requests = await self.store.group.read_new(
                    reader, self.name, count, self._block_ms, shards
                )
            except (RedisError, OSError) as e:
                if isinstance(self._reader, NodeReaders):
                    await self._reader.relocate(key)  # MOVED, or a failover
                what = "refused" if isinstance(e, ResponseError) else "unavailable"
                log.warning(
                    "worker %s: XREADGROUP %s (%s); retrying in %.1fs",
                    self.name,
                    what,
                    e,
                    backoff.delay_s,
                )
                self._unreserve(count)
                await backoff.sleep()
                continue
            self._unreserve(count)
            backoff.reset()
            for entry_id, fields in requests:
                self._spawn(entry_id, fields, resumed=False)

    def _unreserve(self, count: int) -> None:
        self._reserved -= count
        self._slot_free.set()

    def _spawn(self, entry_id: str, fields: dict[str, str], *, resumed: bool) -> None:
        request = QuestionRequest.from_fields(fields)
        answer = Answer(self.store, request, entry_id)
        self._track(entry_id, answer.run(self._gen, resumed=resumed), f"answer-{request.id}")

    def _track(self, entry_id: str, work: Coroutine[Any, Any, Any], name: str) -> None:
        """Run `work` for a request as a slot: a stop waits for it within the grace period."""
        task = asyncio.create_task(work, name=name)
        self._inflight[entry_id] = task
        metrics.SLOTS_IN_USE.inc()
        task.add_done_callback(lambda t: self._done(entry_id, t))

    def _done(self, entry_id: str, task: asyncio.Task[Any]) -> None:
        self._inflight.pop(entry_id, None)
        metrics.SLOTS_IN_USE.dec()
        self._slot_free.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("answer task for request %s failed: %r", entry_id, task.exception())

    # -- reclaiming ---------------------------------------------------------

    async def _reclaim_loop(self) -> None:
        # First pass at once: a restarted worker picks up what its predecessor released.
        interval_s = self._reclaim_idle_ms / 3000
        while True:
            try:
                await self.store.group.heartbeat(self.name, list(self._inflight))
                await self._reclaim()
                await self._sweep()
            except (RedisError, OSError) as e:
                log.warning("worker %s: reclaim pass failed (%s)", self.name, e)
            await wait_set(self._reclaim_now, interval_s)

    async def _reclaim(self) -> None:
        if self.free <= 0 or self._stopping:
            return
        group = self.store.group
        for entry_id, fields in await group.reclaim(self.name, self._reclaim_idle_ms, self.free):
            if entry_id in self._inflight:  # ours, and still running: a missed heartbeat
                continue
            self.reclaimed += 1
            metrics.RECLAIMED.inc()
            if not fields:  # deleted (acknowledged) meanwhile
                await group.ack(entry_id)
                continue
            deliveries = await group.deliveries(entry_id)
            request = QuestionRequest.from_fields(fields)
            if deliveries > self._max_deliveries:
                log.error("question %s delivered %d times; failing it", request.id, deliveries)
                failing = Answer(self.store, request, entry_id).fail_undeliverable(deliveries)
                self._track(entry_id, failing, f"fail-{request.id}")
                continue
            log.warning(
                "worker %s reclaimed question request %s (delivery %d)",
                self.name,
                entry_id,
                deliveries,
            )
            self._spawn(entry_id, fields, resumed=True)

    async def _sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        if now < self._next_sweep or self._stopping:
            return
        every_s = min(3 * self._reclaim_idle_ms / 1000, SWEEP_EVERY_MAX_S)
        self._next_sweep = now + every_s
        lost_after_ms = 3 * self._reclaim_idle_ms
        for record in await self.store.lost(lost_after_ms, int(every_s * 900)):
            log.error("question %s: its request is gone from the stream; failing it", record.id)
            request = QuestionRequest(record.id, record.topic, record.question)
            await Answer(self.store, request, None).fail_lost(record)

    # -- a model loaded before its first question -----------------------------

    async def _load_model(self) -> None:
        """Load a model that loads lazily (the local one: about a second, more on a busy
        machine) now, not with the first question this worker takes; a question that comes
        meanwhile waits for the load, as it would have. Reading requests does not wait for
        it. A model that fails to load is the first question's to report (it tries again)."""
        load: Callable[[], Coroutine[Any, Any, None]] | None = getattr(self._provider, "load", None)
        if load is None:
            return
        started = asyncio.get_running_loop().time()
        try:
            await load()
        except Exception as e:  # the first question reports it, in full
            log.warning("worker %s: the model did not load: %s", self.name, e)
            return
        took_s = asyncio.get_running_loop().time() - started
        log.info("worker %s: model %s loaded in %.1f s", self.name, self._provider.model, took_s)

    # -- a provider stuck in native code ---------------------------------------

    async def _wedge_loop(self) -> None:
        """A provider that ignores being told to stop is dead: say so, and let the owner
        (the supervisor, through `on_wedged`) replace the process."""
        while True:
            await asyncio.sleep(1.0)
            stuck_s = float(getattr(self._provider, "unresponsive_s", 0.0))
            if stuck_s > WEDGED_AFTER_S:
                log.critical(
                    "worker %s: the model ignored a stop for %.0f s (stuck in native code?)",
                    self.name,
                    stuck_s,
                )
                if self._on_wedged is not None:
                    self._on_wedged()
                return
