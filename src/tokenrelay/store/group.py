"""The request streams' consumer group: taking work, heartbeats, reclaiming, acknowledging.

Requests may be spread over several streams (shards, `TOKENRELAY_REQUEST_SHARDS`), each
with its own group `workers`. A request is named by its entry id, prefixed `<shard>/`
when there are several shards, so that its acknowledgement, heartbeat and delivery
count go to its own stream. With one shard every name and command is what it always was.

A consumer is deleted only when it has no pending request left (checked inside Redis),
because XGROUP DELCONSUMER drops a consumer's pending entries with it: they could
never be reclaimed, and their answers would stay `streaming` for ever.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from tokenrelay.connection import is_cluster
from tokenrelay.errors import StoreError
from tokenrelay.keys import WORKER_GROUP, Keys

Request = tuple[str, dict[str, str]]  # (request id, fields)

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


# Resets the idle time of the entries ARGV[3..] still pending for consumer ARGV[2].
_BEAT_OWN = """
for i = 3, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  end
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Depth:
    pending: int  # taken by a worker, not yet acknowledged
    waiting: int  # in the stream and not taken yet (length minus pending)


def request_id(shard: int, entry_id: str, shards: int) -> str:
    return entry_id if shards == 1 else f"{shard}/{entry_id}"


def split_request_id(request: str) -> tuple[int, str]:
    """(shard, entry id) of a request id."""
    shard, sep, entry_id = request.partition("/")
    return (int(shard), entry_id) if sep else (0, request)


class RequestGroup:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.streams = keys.request_shards
        self.stream = self.streams[0]
        self._shard_of = {stream: n for n, stream in enumerate(self.streams)}
        self._cluster = is_cluster(redis)
        self._forget = redis.register_script(_FORGET_IF_IDLE)
        self._beat = redis.register_script(_BEAT_OWN)
        self._next_reclaim = 0

    @property
    def shards(self) -> int:
        return len(self.streams)

    def read_sets(self) -> list[list[int]]:
        """Shards one blocking read may cover together: all of them on one node; in a cluster,
        one each (a command's keys must share a slot)."""
        if self._cluster:
            return [[n] for n in range(self.shards)]
        return [list(range(self.shards))]

    def _id(self, shard: int, entry_id: str) -> str:
        return request_id(shard, entry_id, self.shards)

    def _by_shard(self, requests: Sequence[str]) -> dict[int, list[str]]:
        found: dict[int, list[str]] = defaultdict(list)
        for request in requests:
            shard, entry_id = split_request_id(request)
            found[shard].append(entry_id)
        return found

    async def ensure(self) -> None:
        """Create the group (and the stream) if missing; "already exists" is fine."""
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise StoreError(f"cannot create consumer group: {e}") from e

    async def read_new(
        self,
        reader: Redis,
        consumer: str,
        count: int,
        block_ms: int,
        shards: Sequence[int] = (0,),
    ) -> list[Request]:
        """Up to `count` requests no consumer has taken from `shards` (one of `read_sets()`),
        blocking up to `block_ms` on `reader` (a dedicated connection). A vanished group
        (FLUSHALL, a restart without AOF) is recreated and the read answers nothing."""
        try:
            reply: Any = await reader.xreadgroup(
                WORKER_GROUP,
                consumer,
                {self.streams[n]: ">" for n in shards},
                count=count,
                block=block_ms,
            )
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            await self.ensure()
            return []
        if isinstance(reply, dict):  # RESP3
            reply = list(reply.items())
        return [
            (self._id(self._shard_of[stream], entry_id), fields)
            for stream, entries in reply or []
            for entry_id, fields in entries
        ]

    async def heartbeat(self, consumer: str, requests: list[str]) -> None:
        """Reset the idle time of requests still being answered: a long answer is not a dead
        one. JUSTID: it does not count as another delivery. Only those still pending for
        `consumer`: a worker woken from a pause must not take back what another reclaimed."""
        by_shard = self._by_shard(requests)
        # Side by side: a shard whose node is failing over must not starve the others' beats.
        await asyncio.gather(
            *(
                self._beat(keys=[self.streams[shard]], args=[WORKER_GROUP, consumer, *ids])
                for shard, ids in by_shard.items()
            )
        )

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[Request]:
        """Take up to `count` requests idle for `min_idle_ms` (their worker died or let go),
        looking at the shards in turn from a different one each pass. Entries deleted
        meanwhile come back with no fields."""
        found: list[Request] = []
        start = self._next_reclaim
        self._next_reclaim = (start + 1) % self.shards
        for i in range(self.shards):
            if len(found) >= count:
                break
            shard = (start + i) % self.shards
            reply: Any = await self.redis.xautoclaim(
                self.streams[shard], WORKER_GROUP, consumer, min_idle_ms, "0-0",
                count=count - len(found),
            )  # fmt: skip
            found += [(self._id(shard, entry_id), fields or {}) for entry_id, fields in reply[1]]
        return found

    async def deliveries(self, request: str) -> int:
        shard, entry_id = split_request_id(request)
        info: Any = await self.redis.xpending_range(
            self.streams[shard], WORKER_GROUP, min=entry_id, max=entry_id, count=1
        )
        return int(info[0]["times_delivered"]) if info else 1

    async def pending_of(self, consumer: str, count: int = 10_000) -> list[str]:
        found: list[str] = []
        for shard, stream in enumerate(self.streams):
            info: Any = await self.redis.xpending_range(
                stream, WORKER_GROUP, min="-", max="+", count=count, consumername=consumer
            )
            found += [self._id(shard, str(row["message_id"])) for row in info]
        return found

    async def release(self, consumer: str) -> int:
        """Make every request pending for `consumer` claimable by any live worker now, not
        after the reclaim idle time. Returns how many there were."""
        requests = await self.pending_of(consumer)
        for shard, entry_ids in self._by_shard(requests).items():
            await self.redis.xclaim(
                self.streams[shard],
                WORKER_GROUP,
                consumer,
                0,
                list[Any](entry_ids),
                idle=RELEASED_IDLE_MS,
                justid=True,
            )
        return len(requests)

    async def forget(self, consumer: str) -> bool:
        """Delete `consumer` from every shard where, and only if, no request is pending for
        it there; True when it is gone from all of them."""
        gone = True
        for stream in self.streams:
            gone = bool(await self._forget(keys=[stream], args=[WORKER_GROUP, consumer])) and gone
        return gone

    async def depth(self) -> Depth:
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xpending(stream, WORKER_GROUP)
                pipe.xlen(stream)
            replies = await pipe.execute()
        pending = sum(int(summary["pending"]) for summary in replies[0::2])
        length = sum(int(n) for n in replies[1::2])
        return Depth(pending, max(length - pending, 0))

    async def ack(self, request: str) -> None:
        # Acknowledged requests are deleted too: the request stream only holds live work.
        shard, entry_id = split_request_id(request)
        stream = self.streams[shard]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(stream, WORKER_GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()
