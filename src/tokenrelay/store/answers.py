"""Answers: reading an answer stream, and the worker's writes (start, chunks, terminal entry)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenrelay.errors import Fenced
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


# KEYS: answer stream, record. ARGV: epoch, maxlen, then the entry's field/value pairs.
# Returns 0 when fenced, else {entry id, the record's cancel flag}.
_APPEND = """
if (redis.call('HGET', KEYS[2], 'epoch') or '0') ~= ARGV[1] then return 0 end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
return {id, redis.call('HGET', KEYS[2], 'cancel') or ''}
"""

# KEYS: answer stream, record. ARGV: epoch, maxlen, retention_s, n, then n record field/value
# pairs, then the terminal entry's field/value pairs. Returns 0 when fenced, else the id.
_FINISH = """
if (redis.call('HGET', KEYS[2], 'epoch') or '0') ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[4])
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 5 + 2 * n))
redis.call('HSET', KEYS[2], 'last_entry_id', id, unpack(ARGV, 5, 4 + 2 * n))
redis.call('HDEL', KEYS[2], 'cancel')
if tonumber(ARGV[3]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return id
"""


# (question id, entry, read the cancel flag?[, epoch])
Write = tuple[str, Entry, bool] | tuple[str, Entry, bool, int]


class Answers(StoreBase):
    group: RequestGroup

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._append = self.redis.register_script(_APPEND)
        self._finish = self.redis.register_script(_FINISH)

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
    #
    # One writer per answer: each delivery of a request takes a new epoch (`begin`), and
    # every write checks it inside Redis in the same round trip (the answer stream and its
    # record share a hash slot), so a worker that was paused and reclaimed cannot add a
    # byte once another has begun. A write from an old epoch raises Fenced.

    async def begin(self, question_id: str) -> int:
        """This delivery's epoch: every earlier writer of the answer is fenced off."""
        return int(await self.redis.hincrby(self.keys.question(question_id), RecordField.EPOCH))

    async def start(
        self, request: QuestionRequest, entry: Entry, fields: dict[str, str], epoch: int = 0
    ) -> str:
        """Write the `start` entry and mark the record streaming."""
        ((entry_id, _),) = await self.append_batch([(request.id, entry, False, epoch)])
        if entry_id is None:
            raise Fenced(f"question {request.id}: another worker has taken over its answer")
        mapping = {**fields, RecordField.FIRST_ENTRY_ID: entry_id}
        await self.redis.hset(self.keys.question(request.id), mapping=mapping)  # type: ignore[arg-type]
        return entry_id

    async def append(self, question_id: str, entry: Entry, epoch: int = 0) -> str:
        ((entry_id, _),) = await self.append_batch([(question_id, entry, False, epoch)])
        if entry_id is None:
            raise Fenced(f"question {question_id}: another worker has taken over its answer")
        return entry_id

    async def append_batch(self, batch: Sequence[Write]) -> list[tuple[str | None, bool]]:
        """Append (question id, entry, read the cancel flag? [, epoch]) in one pipeline; for
        each, (its entry id, or None when the epoch is no longer current; whether a cancel was
        asked for — False where not read). No epoch means 0: an answer no delivery has begun
        (written by a tool or a test)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for question_id, entry, _, *epoch in batch:
                args: list[str | int] = [epoch[0] if epoch else 0, self.limits.answer_maxlen]
                for name, value in entry.fields().items():
                    args += [name, value]
                keys = [self.keys.answer(question_id), self.keys.question(question_id)]
                await self._append(keys=keys, args=args, client=pipe)
            results = await pipe.execute()
        out: list[tuple[str | None, bool]] = []
        for (_, _, check_cancel, *_), result in zip(batch, results, strict=True):
            if not result:
                out.append((None, False))
            else:
                out.append((str(result[0]), check_cancel and result[1] == "1"))
        return out

    async def finish(
        self,
        question_id: str,
        entry: Entry,
        fields: dict[str, Any],
        request_entry_id: str | None,
        caller: str = "",
        epoch: int = 0,
    ) -> str:
        """Write the terminal entry, close the record, set retention (in one script, fenced
        by `epoch`), then ack the request and free the question's place in its caller's
        cap."""
        record = {
            **{k: str(v) for k, v in fields.items()},
            RecordField.STATUS: STATUS_OF_TERMINAL[entry.type].value,
            "ended_ms": str(now_ms()),
        }
        args: list[str | int] = [
            epoch,
            self.limits.answer_maxlen,
            self.limits.retention_s,
            len(record),
        ]
        for name, value in record.items():
            args += [name, value]
        for name, value in entry.fields().items():
            args += [name, value]
        keys = [self.keys.answer(question_id), self.keys.question(question_id)]
        entry_id = await self._finish(keys=keys, args=args)
        if not entry_id:
            raise Fenced(f"question {question_id}: another worker has taken over its answer")
        if request_entry_id is not None:
            await self.group.ack(request_entry_id)
        if caller:
            await self.redis.zrem(self.keys.caller_asks(caller), question_id)
        return str(entry_id)
