"""Answers: reading an answer stream, and the worker's writes (start, chunks, terminal entry)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenrelay.store.base import StoreBase, now_ms
from tokenrelay.store.group import RequestGroup
from tokenrelay.wire import (
    STATUS_OF_TERMINAL,
    Entry,
    EntryType,
    QuestionRequest,
    RecordField,
)

XRANGE_PAGE = 500


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


class Answers(StoreBase):
    group: RequestGroup

    # -- reading ----------------------------------------------------------

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

    # -- writing (the worker's side) ----------------------------------------

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
        await self.redis.hset(self.keys.question(request.id), RecordField.FIRST_ENTRY_ID, entry_id)
        return str(entry_id)

    async def append(self, question_id: str, entry: Entry) -> str:
        entry_id = await self.redis.xadd(
            self.keys.answer(question_id),
            entry.fields(),  # type: ignore[arg-type]
            maxlen=self.limits.answer_maxlen,
            approximate=True,
        )
        return str(entry_id)

    async def append_batch(
        self, batch: Sequence[tuple[str, Entry, bool]]
    ) -> list[tuple[str, bool]]:
        """Append (question id, entry, read the cancel flag?) in one pipeline; for each,
        (its entry id, whether a cancel was asked for — False where not read)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for question_id, entry, check_cancel in batch:
                pipe.xadd(
                    self.keys.answer(question_id),
                    entry.fields(),  # type: ignore[arg-type]
                    maxlen=self.limits.answer_maxlen,
                    approximate=True,
                )
                if check_cancel:
                    pipe.hget(self.keys.question(question_id), RecordField.CANCEL)
            results = await pipe.execute()
        out: list[tuple[str, bool]] = []
        at = 0
        for _, _, check_cancel in batch:
            out.append((str(results[at]), check_cancel and results[at + 1] == "1"))
            at += 2 if check_cancel else 1
        return out

    async def finish(
        self,
        question_id: str,
        entry: Entry,
        fields: dict[str, Any],
        request_entry_id: str | None,
        caller: str = "",
    ) -> str:
        """Write the terminal entry, close the record, set retention, ack the request, and
        free the question's place in its caller's cap."""
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
                    RecordField.STATUS: STATUS_OF_TERMINAL[entry.type].value,
                    "ended_ms": str(now_ms()),
                },
            )
            pipe.hdel(record_key, RecordField.CANCEL)
            if self.limits.retention_s > 0:
                pipe.expire(answer_key, self.limits.retention_s)
                pipe.expire(record_key, self.limits.retention_s)
            results = await pipe.execute()
        entry_id = str(results[0])
        await self.redis.hset(record_key, RecordField.LAST_ENTRY_ID, entry_id)
        if request_entry_id is not None:
            await self.group.ack(request_entry_id)
        if caller:
            await self.redis.zrem(self.keys.caller_asks(caller), question_id)
        return entry_id
