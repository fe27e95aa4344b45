"""The data model's Redis operations: ask, record, read, cancel, history, finish."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from tokenrelay.errors import NotFound, StoreError
from tokenrelay.keys import WORKER_GROUP, Keys, new_question_id
from tokenrelay.wire import (
    STATUS_OF_TERMINAL,
    Entry,
    EntryType,
    QuestionRecord,
    QuestionRequest,
    Status,
)

XRANGE_PAGE = 500


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def exclusive(entry_id: str) -> str:
    """XRANGE start that excludes `entry_id` itself (Redis 6.2+)."""
    return f"({entry_id}" if entry_id != "0-0" else "-"


def answer_text(entries: list[Entry]) -> str:
    """The answer's text: its chunks since the last restart."""
    parts: list[str] = []
    for entry in entries:
        if entry.type is EntryType.CHUNK:
            parts.append(entry.text)
        elif entry.type is EntryType.RESTART:
            parts.clear()
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class Limits:
    retention_s: int
    history_max: int
    answer_maxlen: int
    request_maxlen: int


class Store:
    """Every read and write of the data model. Holds no state but names and limits."""

    def __init__(self, redis: Redis, keys: Keys, limits: Limits) -> None:
        self.redis = redis
        self.keys = keys
        self.limits = limits

    # -- asking -----------------------------------------------------------

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.requests, WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise StoreError(f"cannot create consumer group: {e}") from e

    async def ask(
        self, topic: str, question: str, model: str = "", owner: str = ""
    ) -> QuestionRecord:
        """Queue a question. `owner`, when set, names who may watch and cancel it."""
        question_id = new_question_id()
        created = now_ms()
        request = QuestionRequest(question_id, topic, question, model)
        record = {
            "topic": topic,
            "question": question,
            "status": Status.QUEUED.value,
            "created_ms": str(created),
        }
        if owner:
            record["owner"] = owner
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.question(question_id), mapping=record)  # type: ignore[arg-type]
            pipe.zadd(self.keys.history, {question_id: created})
            pipe.zremrangebyrank(self.keys.history, 0, -(self.limits.history_max + 1))
            pipe.xadd(
                self.keys.requests,
                request.fields(),  # type: ignore[arg-type]
                maxlen=self.limits.request_maxlen,
                approximate=True,
            )
            await pipe.execute()
        return QuestionRecord.from_hash(question_id, record)

    async def record(self, question_id: str) -> QuestionRecord:
        h: Any = await self.redis.hgetall(self.keys.question(question_id))
        if not h:
            raise NotFound(f"no question with id {question_id!r} (never asked, or expired)")
        return QuestionRecord.from_hash(question_id, h)

    async def owner(self, question_id: str) -> str:
        """Who asked (an API key's fingerprint), or "" for anyone or an unknown id."""
        value: Any = await self.redis.hget(self.keys.question(question_id), "owner")
        return str(value or "")

    async def request_cancel(self, question_id: str) -> QuestionRecord:
        record = await self.record(question_id)
        if record.status not in (Status.QUEUED, Status.STREAMING):
            return record
        await self.redis.hset(self.keys.question(question_id), "cancel", "1")
        return record

    async def history(self, limit: int, owner: str | None = None) -> list[QuestionRecord]:
        """The newest `limit` questions; only `owner`'s when given."""
        found: list[QuestionRecord] = []
        start, page = 0, limit if owner is None else max(limit, 100)
        # The index is bounded (history_max), so even a filtered scan is.
        while len(found) < limit:
            records, seen = await self._history_page(start, page, owner)
            found.extend(records)
            if seen < page or owner is None:
                break
            start += page
        return found[:limit]

    async def _history_page(
        self, start: int, count: int, owner: str | None
    ) -> tuple[list[QuestionRecord], int]:
        """Records of ids [start, start+count) of the index, and how many ids there were."""
        ids: Any = await self.redis.zrevrange(self.keys.history, start, start + count - 1)
        if not ids:
            return [], 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for question_id in ids:
                pipe.hgetall(self.keys.question(question_id))
            hashes: list[dict[str, str]] = await pipe.execute()
        expired = [qid for qid, h in zip(ids, hashes, strict=True) if not h]
        if expired:
            await self.redis.zrem(self.keys.history, *expired)
        records = [
            QuestionRecord.from_hash(qid, h)
            for qid, h in zip(ids, hashes, strict=True)
            if h and (owner is None or h.get("owner", "") == owner)
        ]
        return records, len(ids)

    # -- reading answers --------------------------------------------------

    async def read(
        self, question_id: str, after: str = "0-0", count: int = XRANGE_PAGE
    ) -> list[Entry]:
        """Up to `count` entries strictly after the cursor `after`."""
        raw: Any = await self.redis.xrange(
            self.keys.answer(question_id), exclusive(after), "+", count=count
        )
        return [Entry.from_fields(entry_id, fields) for entry_id, fields in raw]

    async def read_all(self, question_id: str, after: str = "0-0") -> list[Entry]:
        entries: list[Entry] = []
        while True:
            page = await self.read(question_id, after)
            entries.extend(page)
            if len(page) < XRANGE_PAGE:
                return entries
            after = page[-1].entry_id

    async def last_entry_id(self, question_id: str) -> str:
        raw = await self.redis.xrevrange(self.keys.answer(question_id), count=1)
        return str(raw[0][0]) if raw else "0-0"

    # -- writing answers (the worker's side) -------------------------------

    async def start(self, request: QuestionRequest, entry: Entry, fields: dict[str, str]) -> str:
        """Write the `start` entry and mark the record streaming."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self.keys.answer(request.id),
                entry.fields(),  # type: ignore[arg-type]
                maxlen=self.limits.answer_maxlen,
                approximate=True,
            )
            pipe.hset(self.keys.question(request.id), mapping=fields)  # type: ignore[arg-type]
            entry_id, _ = await pipe.execute()
        await self.redis.hset(self.keys.question(request.id), "first_entry_id", entry_id)
        return str(entry_id)

    async def append(self, question_id: str, entry: Entry) -> str:
        entry_id = await self.redis.xadd(
            self.keys.answer(question_id),
            entry.fields(),  # type: ignore[arg-type]
            maxlen=self.limits.answer_maxlen,
            approximate=True,
        )
        return str(entry_id)

    async def finish(
        self, question_id: str, entry: Entry, fields: dict[str, Any], request_entry_id: str | None
    ) -> str:
        """Write the terminal entry, close the record, set retention, ack the request."""
        answer_key = self.keys.answer(question_id)
        record_key = self.keys.question(question_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                answer_key,
                entry.fields(),  # type: ignore[arg-type]
                maxlen=self.limits.answer_maxlen,
                approximate=True,
            )
            pipe.hset(
                record_key,
                mapping={
                    **{k: str(v) for k, v in fields.items()},
                    "status": STATUS_OF_TERMINAL[entry.type].value,
                    "ended_ms": str(now_ms()),
                },
            )
            pipe.hdel(record_key, "cancel")
            if self.limits.retention_s > 0:
                pipe.expire(answer_key, self.limits.retention_s)
                pipe.expire(record_key, self.limits.retention_s)
            results = await pipe.execute()
        entry_id = str(results[0])
        await self.redis.hset(record_key, "last_entry_id", entry_id)
        if request_entry_id is not None:
            await self.ack(request_entry_id)
        return entry_id

    async def ack(self, request_entry_id: str) -> None:
        # Acknowledged requests are deleted too: the request stream only holds live work.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.keys.requests, WORKER_GROUP, request_entry_id)
            pipe.xdel(self.keys.requests, request_entry_id)
            await pipe.execute()

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except RedisError:
            return False
