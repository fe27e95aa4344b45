"""Idempotent asks: the first ask made with a caller's key is the only one; a retry with the
same key gets the same question, a different body with it is a conflict."""

from __future__ import annotations

import asyncio

from tokenrelay.errors import Conflict, Overloaded
from tokenrelay.store.base import StoreBase

IDEMPOTENCY_TTL_S = 24 * 3600
_PENDING = "pending"
_WAIT_S = 0.05
_WAITS = 200  # 10 s for the first ask with a key to be made


class Idempotency(StoreBase):
    async def claim(self, caller: str, key: str, digest: str) -> str | None:
        """None when this is the first ask with `key` (make it, then `remember` its id);
        else the id of the question the first ask made. Conflict when the key was used
        for a different question (`digest` differs)."""
        name = self.keys.idempotency(caller, key)
        for _ in range(_WAITS):
            if await self.redis.set(name, f"{_PENDING} {digest}", nx=True, ex=IDEMPOTENCY_TTL_S):
                return None
            value = await self.redis.get(name)
            if value is None:  # expired or withdrawn meanwhile: try to claim again
                continue
            state, _, first_digest = str(value).partition(" ")
            if first_digest != digest:
                raise Conflict(
                    "this Idempotency-Key was used for a different question in the last 24 h; "
                    "use a new key for a new question"
                )
            if state != _PENDING:
                return state
            await asyncio.sleep(_WAIT_S)  # the first ask with the key is being made
        raise Overloaded("the first ask with this Idempotency-Key is still being made", 1.0)

    async def remember(self, caller: str, key: str, digest: str, question_id: str) -> None:
        name = self.keys.idempotency(caller, key)
        await self.redis.set(name, f"{question_id} {digest}", ex=IDEMPOTENCY_TTL_S)

    async def withdraw(self, caller: str, key: str) -> None:
        """The ask failed: the key is free for a retry."""
        await self.redis.delete(self.keys.idempotency(caller, key))
