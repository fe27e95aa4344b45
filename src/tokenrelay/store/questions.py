"""Questions: asking (record, history, request), reading records, cancelling, history."""

from __future__ import annotations

from typing import Any

from redis.exceptions import ResponseError

from tokenrelay.errors import NotFound, StoreError
from tokenrelay.keys import new_question_id
from tokenrelay.store.base import StoreBase, now_ms
from tokenrelay.wire import QuestionRecord, QuestionRequest, RecordField, Status


class Questions(StoreBase):
    async def ask(
        self, topic: str, question: str, model: str = "", owner: str = ""
    ) -> QuestionRecord:
        """Queue a question. `owner`, when set, names who may watch and cancel it."""
        question_id = new_question_id()
        created = now_ms()
        request = QuestionRequest(question_id, topic, question, model)
        record = {
            RecordField.TOPIC: topic,
            RecordField.QUESTION: question,
            RecordField.STATUS: Status.QUEUED.value,
            RecordField.CREATED_MS: str(created),
        }
        if owner:
            record[RecordField.OWNER] = owner
        try:
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
        except ResponseError as e:
            if str(e).startswith("OOM"):
                raise StoreError("Redis is out of memory (maxmemory); try again later") from e
            raise
        return QuestionRecord.from_hash(question_id, record)

    async def record(self, question_id: str) -> QuestionRecord:
        h: Any = await self.redis.hgetall(self.keys.question(question_id))
        if not h:
            raise NotFound(f"no question with id {question_id!r} (never asked, or expired)")
        return QuestionRecord.from_hash(question_id, h)

    async def owner(self, question_id: str) -> str:
        """Who asked (an API key's fingerprint), or "" for anyone or an unknown id."""
        value: Any = await self.redis.hget(self.keys.question(question_id), RecordField.OWNER)
        return str(value or "")

    async def request_cancel(self, question_id: str) -> QuestionRecord:
        record = await self.record(question_id)
        if record.status not in (Status.QUEUED, Status.STREAMING):
            return record
        await self.redis.hset(self.keys.question(question_id), RecordField.CANCEL, "1")
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
            if h and (owner is None or h.get(RecordField.OWNER, "") == owner)
        ]
        return records, len(ids)
