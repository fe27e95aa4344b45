"""The request stream's consumer group: taking work, heartbeats, reclaiming, acknowledging.

A consumer is deleted only when it has no pending request left (checked inside Redis),
because XGROUP DELCONSUMER drops a consumer's pending entries with it: they could
never be reclaimed, and their answers would stay `streaming` for ever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from tokenrelay.errors import StoreError
from tokenrelay.keys import WORKER_GROUP, Keys

Request = tuple[str, dict[str, str]]  # (request entry id, fields)

# Idle time given to released requests: past any reclaim threshold, so the next reclaim pass
# of any live worker takes them (XAUTOCLAIM's min-idle-time).
RELEASED_IDLE_MS = 10**10

# Deletes the consumer only if nothing is pending for it, atomically.
_FORGET_IF_IDLE = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


@dataclass(frozen=True, slots=True)
class Depth:
    pending: int  # taken by a worker, not yet acknowledged
    waiting: int  # in the stream and not taken yet (length minus pending)


class RequestGroup:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.stream = keys.requests
        self._forget = redis.register_script(_FORGET_IF_IDLE)

    async def ensure(self) -> None:
        """Create the group (and the stream) if missing; "already exists" is fine."""
        try:
            await self.redis.xgroup_create(self.stream, WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise StoreError(f"cannot create consumer group: {e}") from e

    async def read_new(
        self, reader: Redis, consumer: str, count: int, block_ms: int
    ) -> list[Request]:
        """Up to `count` requests no consumer has taken, blocking up to `block_ms` on `reader`
        (a dedicated connection). A vanished group (FLUSHALL, a restart without AOF) is
        recreated and the read answers nothing."""
        try:
            reply: Any = await reader.xreadgroup(
                WORKER_GROUP, consumer, {self.stream: ">"}, count=count, block=block_ms
            )
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            await self.ensure()
            return []
        return [
            (entry_id, fields) for _stream, entries in reply or [] for entry_id, fields in entries
        ]

    async def heartbeat(self, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of requests still being answered: a long answer is not a dead
        one. JUSTID: it does not count as another delivery."""
        if entry_ids:
            await self.redis.xclaim(
                self.stream, WORKER_GROUP, consumer, 0, list[Any](entry_ids), justid=True
            )

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[Request]:
        """Take up to `count` requests idle for `min_idle_ms` (their worker died or let go).
        Entries deleted meanwhile come back with no fields."""
        reply: Any = await self.redis.xautoclaim(
            self.stream, WORKER_GROUP, consumer, min_idle_ms, "0-0", count=count
        )
        return [(entry_id, fields or {}) for entry_id, fields in reply[1]]

    async def deliveries(self, entry_id: str) -> int:
        info: Any = await self.redis.xpending_range(
            self.stream, WORKER_GROUP, min=entry_id, max=entry_id, count=1
        )
        return int(info[0]["times_delivered"]) if info else 1

    async def pending_of(self, consumer: str, count: int = 10_000) -> list[str]:
        info: Any = await self.redis.xpending_range(
            self.stream, WORKER_GROUP, min="-", max="+", count=count, consumername=consumer
        )
        return [str(row["message_id"]) for row in info]

    async def release(self, consumer: str) -> int:
        """Make every request pending for `consumer` claimable by any live worker now, not
        after the reclaim idle time. Returns how many there were."""
        entry_ids = await self.pending_of(consumer)
        if entry_ids:
            await self.redis.xclaim(
                self.stream,
                WORKER_GROUP,
                consumer,
                0,
                list[Any](entry_ids),
                idle=RELEASED_IDLE_MS,
                justid=True,
            )
        return len(entry_ids)

    async def forget(self, consumer: str) -> bool:
        """Delete `consumer` if, and only if, no request is pending for it."""
        return bool(await self._forget(keys=[self.stream], args=[WORKER_GROUP, consumer]))

    async def depth(self) -> Depth:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xpending(self.stream, WORKER_GROUP)
            pipe.xlen(self.stream)
            summary, length = await pipe.execute()
        pending = int(summary["pending"])
        return Depth(pending, max(int(length) - pending, 0))

    async def ack(self, entry_id: str) -> None:
        # Acknowledged requests are deleted too: the request stream only holds live work.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.stream, WORKER_GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()
