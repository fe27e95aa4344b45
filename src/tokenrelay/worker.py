"""The consumer-group loop: take questions, answer them, reclaim what dead workers left.

Lifecycle (staged, as saq does it): `stop()` stops taking work, lets running
answers finish within the grace period, then cancels what is left (their
requests stay pending, so another worker reclaims them) and logs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from tokenrelay import metrics
from tokenrelay.generation import fail_undeliverable, generate
from tokenrelay.keys import WORKER_GROUP
from tokenrelay.providers.base import Provider
from tokenrelay.providers.guard import Timeouts
from tokenrelay.store import Store
from tokenrelay.wire import QuestionRequest
from tokenrelay.writer import ChunkWriter

log = logging.getLogger(__name__)

HARD_DEADLINE_S = 5.0


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class Worker:
    def __init__(
        self,
        store: Store,
        reader: Redis,
        provider: Provider,
        *,
        concurrency: int,
        block_ms: int,
        reclaim_idle_ms: int,
        max_deliveries: int,
        grace_period_s: float,
        timeouts: Timeouts,
        answer_maxlen: int,
        name: str | None = None,
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
        self._timeouts = timeouts
        self._writer = ChunkWriter(store.redis, store.keys, answer_maxlen)
        self._inflight: dict[str, asyncio.Task[Any]] = {}  # request entry id -> task
        self._slot_free = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        self.reclaimed = 0

    @property
    def busy(self) -> int:
        return len(self._inflight)

    async def start(self) -> None:
        await self.store.ensure_group()
        self._writer.start()
        metrics.SLOTS.inc(self._concurrency)
        self._loops = [
            asyncio.create_task(self._read_loop(), name=f"{self.name}-read"),
            asyncio.create_task(self._reclaim_loop(), name=f"{self.name}-reclaim"),
        ]
        log.info(
            "worker %s started: %d slots, provider %s (%s)",
            self.name,
            self._concurrency,
            self._provider.name,
            self._provider.model,
        )

    async def stop(self) -> None:
        """Safe to call twice."""
        if self._stopping:
            return
        self._stopping = True
        metrics.SLOTS.dec(self._concurrency)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        running = list(self._inflight.values())
        if running:
            log.info(
                "worker %s: waiting up to %gs for %d answers",
                self.name,
                self._grace_period_s,
                len(running),
            )
            _, pending = await asyncio.wait(running, timeout=self._grace_period_s)
            if pending:
                log.warning(
                    "worker %s: cancelling %d unfinished answers (%s); their "
                    "requests stay pending for another worker",
                    self.name,
                    len(pending),
                    ", ".join(t.get_name() for t in pending),
                )
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=HARD_DEADLINE_S)
        await self._writer.stop()
        with contextlib.suppress(RedisError):  # best effort: an idle consumer is harmless
            await self.store.redis.xgroup_delconsumer(
                self.store.keys.requests, WORKER_GROUP, self.name
            )
        await self._reader.aclose()

    # -- taking work --------------------------------------------------------

    async def _read_loop(self) -> None:
        backoff_s = 0.1
        while True:
            free = self._concurrency - len(self._inflight)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                reply: Any = await self._reader.xreadgroup(
                    WORKER_GROUP,
                    self.name,
                    {self.store.keys.requests: ">"},
                    count=free,
                    block=self._block_ms,
                )
            except ResponseError as e:
                if "NOGROUP" in str(e):
                    # The stream was deleted under us (FLUSHALL, a restart without AOF).
                    log.error("worker %s: consumer group vanished; recreating it", self.name)
                    await self.store.ensure_group()
                    continue
                log.error(
                    "worker %s: XREADGROUP refused (%s); retrying in %.1fs", self.name, e, backoff_s
                )
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            except (RedisError, OSError) as e:
                log.warning(
                    "worker %s: Redis unavailable (%s); retrying in %.1fs", self.name, e, backoff_s
                )
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            backoff_s = 0.1
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    self._spawn(entry_id, fields, resumed=False)

    def _spawn(self, entry_id: str, fields: dict[str, str], *, resumed: bool) -> None:
        request = QuestionRequest.from_fields(fields)
        task = asyncio.create_task(
            generate(
                self.store,
                self._writer,
                self._provider,
                request,
                entry_id,
                self._timeouts,
                resumed=resumed,
            ),
            name=f"answer-{request.id}",
        )
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
        interval_s = self._reclaim_idle_ms / 3000
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._heartbeat()
                await self._reclaim()
            except (RedisError, OSError) as e:
                log.warning("worker %s: reclaim pass failed (%s)", self.name, e)

    async def _heartbeat(self) -> None:
        """Reset the idle time of our own pending requests: a long answer is not a dead one."""
        if self._inflight:
            # JUSTID: claiming does not count as another delivery.
            await self.store.redis.xclaim(
                self.store.keys.requests,
                WORKER_GROUP,
                self.name,
                0,
                list(self._inflight),
                justid=True,
            )

    async def _reclaim(self) -> None:
        free = self._concurrency - len(self._inflight)
        if free <= 0 or self._stopping:
            return
        keys = self.store.keys
        reply: Any = await self.store.redis.xautoclaim(
            keys.requests, WORKER_GROUP, self.name, self._reclaim_idle_ms, "0-0", count=free
        )
        claimed = reply[1]
        for entry_id, fields in claimed:
            if entry_id in self._inflight:  # ours, and still running: a missed heartbeat
                continue
            info: Any = await self.store.redis.xpending_range(
                keys.requests, WORKER_GROUP, min=entry_id, max=entry_id, count=1
            )
            deliveries = int(info[0]["times_delivered"]) if info else 1
            self.reclaimed += 1
            metrics.RECLAIMED.inc()
            if not fields:
                await self.store.ack(entry_id)
                continue
            if deliveries > self._max_deliveries:
                request = QuestionRequest.from_fields(fields)
                log.error("question %s delivered %d times; failing it", request.id, deliveries)
                await fail_undeliverable(self.store, request, entry_id, deliveries)
                continue
            log.warning(
                "worker %s reclaimed question request %s (delivery %d)",
                self.name,
                entry_id,
                deliveries,
            )
            self._spawn(entry_id, fields, resumed=True)
