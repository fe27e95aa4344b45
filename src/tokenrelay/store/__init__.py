"""Every Redis command of the data model: questions, answers, the request consumer group.

`Store` is what the gateway and the worker hold; `store.group` is the consumer group.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenrelay.connection import Lane
from tokenrelay.keys import Keys
from tokenrelay.store.answers import (
    XRANGE_PAGE,
    Answers,
    Applied,
    Put,
    answer_text,
    exclusive,
    next_entry_id,
)
from tokenrelay.store.base import Limits, now_ms
from tokenrelay.store.group import Depth, Request, RequestGroup
from tokenrelay.store.idempotency import Idempotency
from tokenrelay.store.questions import Questions

__all__ = [
    "XRANGE_PAGE",
    "Applied",
    "Depth",
    "Limits",
    "Put",
    "Request",
    "RequestGroup",
    "Store",
    "answer_text",
    "exclusive",
    "next_entry_id",
    "now_ms",
]


class Store(Questions, Answers, Idempotency):
    """Every read and write of the data model. Holds no state but names, limits and the batch
    of concurrent callers' commands (on `lane`, a connection its process opened for them)."""

    def __init__(self, redis: Redis, keys: Keys, limits: Limits, lane: Lane | None = None) -> None:
        super().__init__(redis, keys, limits, lane)
        self.group = RequestGroup(redis, keys)

    async def ensure_group(self) -> None:
        await self.group.ensure()

    async def ack(self, request_entry_id: str) -> None:
        await self.group.ack(request_entry_id)

    async def ping(self, timeout_s: float | None = None) -> bool:
        """Whether Redis answers (within `timeout_s`: a cluster client keeps trying for up
        to 20 s while a failover lasts, which a health check must not wait for)."""
        try:
            async with asyncio.timeout(timeout_s):
                return bool(await self.redis.ping())
        except (RedisError, TimeoutError):
            return False
