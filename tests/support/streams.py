"""What Redis holds for an answer: the truth viewers are checked against."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from tokenrelay.keys import Keys


async def chunk_ids(redis: Redis, keys: Keys, qid: str) -> list[str]:
    """The entry IDs of the answer's chunks, in order (XRANGE)."""
    entries: Any = await redis.xrange(keys.answer(qid))
    return [str(entry_id) for entry_id, fields in entries if fields.get("type") == "chunk"]
