"""Questions: asking (record, history, request), reading records, cancelling, history."""

from __future__ import annotations

import itertools
from typing import Any

from redis.exceptions import OutOfMemoryError, ResponseError

from tokenrelay.errors import CallerFull, NotFound, Overloaded, StoreError
from tokenrelay.store.autopipeline import as_dict
from tokenrelay.store.base import StoreBase, now_ms
from tokenrelay.store.group import request_id as make_request_id
from tokenrelay.store.group import split_request_id
from tokenrelay.wire import Context, QuestionRecord, QuestionRequest, RecordField, Status, dumps

# A caller's question that is still unfinished this long after it was asked no longer
# counts toward its cap (its answer was lost with a Redis that restarted without it).
CALLER_STALE_MS = 3_600_000
FULL_RETRY_AFTER_S = 5.0
UNFINISHED_GRACE_S = 24 * 3600

# Reserve a place for a question in its caller's set, unless the caller is at its cap.
_RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# Queue a question in one step: unless its shard holds ARGV[1] requests, XADD the request
# and write the record with the request's id (a worker that takes the request always finds
# the record; a refused ask leaves nothing). The request shard and the record share a slot
# (in cluster mode a question's keys carry its shard's tag).
# KEYS: request shard, record. ARGV: max in the shard, the record's TTL (0: none), the
# request id's prefix ("shard/" or ""), n, then n record field/value pairs, then the
# request's field/value pairs. Returns the request's entry id, or false when full.
_ENQUEUE = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
local n = tonumber(ARGV[4])
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 5 + 2 * n))
redis.call('HSET', KEYS[2], 'request_id', ARGV[3] .. id, unpack(ARGV, 5, 4 + 2 * n))
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
return id
"""

# On a single node, all of an ask in one step (one round trip, sent with the other asks of
# the moment): _RESERVE's check and _ENQUEUE's, then the place, the request, the record,
# and the history index. A refused ask writes nothing (the caller's expired places aside).
# KEYS: request shard, record, history, and the caller's set when there is a caller.
# ARGV: max in the shard, the record's TTL (0: none), the request id's prefix, the
# created time, the question id, the history's -(max + 1), the caller's cap, its stale
# time, its set's TTL (ms), n, then n record field/value pairs, then the request's.
# Returns the request's entry id, 0 when the shard is full, -1 when the caller is.
_ASK = """
local caller = KEYS[4]
if caller then
  redis.call('ZREMRANGEBYSCORE', caller, '-inf', ARGV[8])
  if redis.call('ZCARD', caller) >= tonumber(ARGV[7]) then return -1 end
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
if caller then
  redis.call('ZADD', caller, ARGV[4], ARGV[5])
  redis.call('PEXPIRE', caller, ARGV[9])
end
local n = tonumber(ARGV[10])
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 11 + 2 * n))
redis.call('HSET', KEYS[2], 'request_id', ARGV[3] .. id, unpack(ARGV, 11, 10 + 2 * n))
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, ARGV[6])
return id
"""


class Questions(StoreBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reserve = self.redis.register_script(_RESERVE)
        self._enqueue_script = self.redis.register_script(_ENQUEUE)
        self._ask_script = self.redis.register_script(_ASK)

    async def ask(
        self,
        topic: str,
        question: str,
        model: str = "",
        owner: str = "",
        caller: str = "",
        context: Context | None = None,
    ) -> QuestionRecord:
        """Queue a question. `owner`, when set, names who may watch and cancel it; `caller`
        (default: the owner) is who the per-caller cap counts it for; `context` brings the
        conversation, options and thread. Refused with Overloaded, never dropped later, when
        the backlog or the caller is full."""
        context = context or Context()
        question_id = self.keys.new_question_id()
        created = now_ms()
        caller = caller or owner
        if self._together is None:
            await self._reserve_for(caller, question_id, created)
        record = {
            RecordField.TOPIC: topic,
            RecordField.QUESTION: question,
            RecordField.STATUS: Status.QUEUED.value,
            RecordField.CREATED_MS: str(created),
        }
        if owner:
            record[RecordField.OWNER] = owner
        if caller:
            record[RecordField.CALLER] = caller
        if context.follows:
            record[RecordField.FOLLOWS] = context.follows
            record[RecordField.THREAD] = context.thread or context.follows
        if context.history:  # kept for replay: what the model was given before the question
            turns = [{"role": t.role, "content": t.content} for t in context.history]
            record[RecordField.CONVERSATION] = dumps(turns)
        request = QuestionRequest(
            question_id, topic, question, model, context.history, context.options
        )
        try:
            if self._together is None:
                record[RecordField.REQUEST_ID] = await self._enqueue(request, created, record)
            else:
                record[RecordField.REQUEST_ID] = await self._ask_at_once(
                    request, created, record, caller
                )
        except ResponseError as e:
            await self._withdraw(question_id, caller)
            # redis-py raises OutOfMemoryError for an OOM reply; inside a pipeline the message
            # names the command first ("Command # 1 (EVALSHA ...) of pipeline caused error: OOM").
            if isinstance(e, OutOfMemoryError) or "OOM" in str(e):
                raise StoreError("Redis is out of memory (maxmemory); try again later") from e
            raise
        except Overloaded:
            if self._together is None:  # _ask_at_once writes nothing when it refuses
                await self._withdraw(question_id, caller)
            raise
        return QuestionRecord.from_hash(question_id, record)

    async def _ask_at_once(
        self, request: QuestionRequest, created: int, record: dict[str, str], caller: str
    ) -> str:
        """Single node: the whole ask in one script (_ASK), sent with the other asks of the
        moment; the request's id. CallerFull, or Overloaded, when there is no room."""
        assert self._together is not None
        shards = self.keys.shards
        shard = self.keys.shard_of(request.id)
        keys = [self.keys.request_shard(shard), self.keys.question(request.id), self.keys.history]
        if caller:
            keys.append(self.keys.caller_asks(caller))
        args: list[int | str] = [
            -(-self.limits.max_queued // shards),
            self._record_ttl_s(),
            make_request_id(shard, "", shards),
            created,
            request.id,
            -(self.limits.history_max + 1),
            self.limits.max_queued_per_caller,
            created - CALLER_STALE_MS,
            CALLER_STALE_MS,
            len(record),
            *itertools.chain.from_iterable(record.items()),
            *itertools.chain.from_iterable(request.fields().items()),
        ]
        reply = await self._together.script(self._ask_script, keys, args)
        if reply == -1:
            raise self._caller_full()
        if not reply:
            raise self._full()
        return make_request_id(shard, str(reply), shards)

    def _record_ttl_s(self) -> int:
        # Every record expires, whatever its status; an unfinished one a day after the
        # retention at the earliest (a long queue or answer must not lose it), the finished
        # one `retention_s` after its end (Store.finish).
        retention_s = self.limits.retention_s
        return retention_s + UNFINISHED_GRACE_S if retention_s > 0 else 0

    def _caller_full(self) -> CallerFull:
        return CallerFull(
            f"you have {self.limits.max_queued_per_caller} questions queued or being "
            "answered, the most one caller may; wait for one to finish",
            FULL_RETRY_AFTER_S,
        )

    def _full(self) -> Overloaded:
        return Overloaded(
            f"tokenrelay is full: {self.limits.max_queued} questions are queued or being "
            f"answered; try again in {FULL_RETRY_AFTER_S:g} s",
            FULL_RETRY_AFTER_S,
        )

    async def _reserve_for(self, caller: str, question_id: str, created: int) -> None:
        """A place in the caller's share (CallerFull when it has none left)."""
        if not caller:
            return
        args: list[int | str] = [
            created,
            created - CALLER_STALE_MS,
            self.limits.max_queued_per_caller,
            question_id,
            CALLER_STALE_MS,
        ]
        if not await self._reserve(keys=[self.keys.caller_asks(caller)], args=args):
            raise self._caller_full()

    async def _enqueue(self, request: QuestionRequest, created: int, record: dict[str, str]) -> str:
        """Queue the request and write its record (one script, see _ENQUEUE) unless its shard
        is full, and index the question in the history, in one round trip; the request's id.

        The request stream is never trimmed: a request leaves it when its answer ends. Each
        of the n shards holds at most 1/n of TOKENRELAY_MAX_QUEUED (rounded up): the check
        stays one script on one slot, and ids spread questions evenly over the shards."""
        shards = self.keys.shards
        shard = self.keys.shard_of(request.id)
        args: list[int | str] = [
            -(-self.limits.max_queued // shards),
            self._record_ttl_s(),
            make_request_id(shard, "", shards),
            len(record),
            *itertools.chain.from_iterable(record.items()),
            *itertools.chain.from_iterable(request.fields().items()),
        ]
        keys = [self.keys.request_shard(shard), self.keys.question(request.id)]
        async with self.redis.pipeline(transaction=False) as pipe:
            await self._enqueue_script(keys=keys, args=args, client=pipe)
            # After the record (one connection keeps the order on one node): a history read
            # that finds an id without its record takes it for expired and drops it.
            pipe.zadd(self.keys.history, {request.id: created})
            pipe.zremrangebyrank(self.keys.history, 0, -(self.limits.history_max + 1))
            entry_id, *_ = await pipe.execute()
        if not entry_id:
            raise self._full()
        return make_request_id(shard, str(entry_id), shards)

    async def _withdraw(self, question_id: str, caller: str) -> None:
        """Undo a refused ask: no record, no history entry, no place held."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.question(question_id))
            pipe.zrem(self.keys.history, question_id)
            if caller:
                pipe.zrem(self.keys.caller_asks(caller), question_id)
            await pipe.execute()

    async def record(self, question_id: str) -> QuestionRecord:
        key = self.keys.question(question_id)
        if self._together is None:
            h: Any = await self.redis.hgetall(key)
        else:  # read with the other asks and reads of the moment (a burst's watches)
            h = await self._together.command("HGETALL", key, parse=as_dict)
        if not h:
            raise NotFound(f"no question with id {question_id!r} (never asked, or expired)")
        return QuestionRecord.from_hash(question_id, h)

    async def owner(self, question_id: str) -> str:
        """Who asked (an API key's fingerprint), or "" for anyone or an unknown id."""
        value: Any = await self.redis.hget(self.keys.question(question_id), RecordField.OWNER)
        return str(value or "")

    async def cancel_requested(self, question_id: str) -> bool:
        flag: Any = await self.redis.hget(self.keys.question(question_id), RecordField.CANCEL)
        return bool(flag == "1")

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
            records, seen, removed = await self._history_page(start, page, owner)
            found.extend(records)
            if seen < page or owner is None:
                break
            # The expired ids just removed shrank the index: the next page starts that much
            # nearer, or as many ids would be skipped.
            start += seen - removed
        return found[:limit]

    async def _history_page(
        self, start: int, count: int, owner: str | None
    ) -> tuple[list[QuestionRecord], int, int]:
        """Records of ids [start, start+count) of the index, how many ids there were, and how
        many of them were expired (and removed from the index)."""
        ids: Any = await self.redis.zrevrange(self.keys.history, start, start + count - 1)
        if not ids:
            return [], 0, 0
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
        return records, len(ids), len(expired)

    async def lost(self, older_than_ms: int, lock_ms: int) -> list[QuestionRecord]:
        """Questions still `queued` whose request is no longer in the request stream (lost
        with a Redis that restarted without it): nothing would ever answer them. Only one
        caller at a time gets them (a lock for `lock_ms`); the others get []."""
        if not await self.redis.set(self.keys.sweep_lock, "1", nx=True, px=lock_ms):
            return []
        ids: Any = await self.redis.zrangebyscore(
            self.keys.history, "-inf", now_ms() - older_than_ms
        )
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for question_id in ids:
                pipe.hgetall(self.keys.question(question_id))
            hashes: list[dict[str, str]] = await pipe.execute()
        queued = [
            QuestionRecord.from_hash(qid, h)
            for qid, h in zip(ids, hashes, strict=True)
            if h.get(RecordField.STATUS) == Status.QUEUED.value and h.get(RecordField.REQUEST_ID)
        ]
        if not queued:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for record in queued:
                shard, entry_id = split_request_id(record.request_id)
                pipe.xrange(self.keys.request_shard(shard), entry_id, entry_id, count=1)
            found: list[Any] = await pipe.execute()
        return [record for record, rows in zip(queued, found, strict=True) if not rows]
