"""What every part of the store shares: the connection, the key names, the limits."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from tokenrelay.connection import Lane, is_cluster
from tokenrelay.keys import Keys
from tokenrelay.store.autopipeline import AutoPipeline


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Limits:
    retention_s: int
    history_max: int
    answer_maxlen: int
    max_queued: int  # requests in the stream (queued or being answered) before asks are refused
    max_queued_per_caller: int


class StoreBase:
    """Holds no state but the client, names, limits, and the batch of concurrent callers'
    commands (`_together`, single node: see autopipeline.py), sent on `lane` when given."""

    def __init__(self, redis: Redis, keys: Keys, limits: Limits, lane: Lane | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.limits = limits
        self._together = None if is_cluster(redis) else AutoPipeline(redis, lane)

    async def _script(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """`script`'s reply: sent with the other commands of the moment on a single node (a
        burst's), alone in a cluster."""
        if self._together is None:
            return await script(keys=keys, args=args)
        return await self._together.script(script, keys, args)
