"""Answers: reading an answer stream, and the worker's writes (start, chunks, terminal entry)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from tokenrelay.connection import Lane, bulk, call_packed, is_cluster, own_lane
from tokenrelay.errors import Fenced, Rewound
from tokenrelay.keys import WORKER_GROUP
from tokenrelay.store.base import StoreBase, now_ms
from tokenrelay.store.group import RequestGroup, split_request_id
from tokenrelay.wire import (
    STATUS_OF_TERMINAL,
    Entry,
    EntryType,
    QuestionRecord,
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


def next_entry_id(prev: str, now: int) -> str:
    """The id a worker gives an answer's next entry: `now` (ms), or just after `prev` while
    the clock has not passed it. The worker chooses its ids so that a write sent again (a
    lost reply, a failover) is the same write: Redis can tell it was applied, and a viewer
    that saw the entry knows it by its id."""
    if not prev:
        return f"{now}-0"
    ms, _, seq = prev.partition("-")
    return f"{now}-0" if now > int(ms) else f"{ms}-{int(seq) + 1}"


# Whether stream id a sorts after b.
_AFTER = """
local function after(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, bm = tonumber(am), tonumber(bm)
  return am > bm or (am == bm and tonumber(as) > tonumber(bs))
end
"""

# The doorbell (single node): every script call that adds answer entries publishes one
# message on the channel `Keys.written` (ARGV[1]; "" rings nothing: a cluster) naming the
# answer streams it added to, and carrying the entries themselves where it can. A
# gateway's relay listens there (relay.py) instead of blocking on every relayed answer:
# that cost Valkey ~0.75 us a key each time it re-armed, and a doorbell stream that the
# gateway read again after every ring cost a round trip per wake. The message is a JSON
# array with one array of strings per answer stream, in the order first written: its key
# alone when an entry could not be carried (read the stream from your cursor), else its
# key, the id of the entry just before the first carried one in the stream ("0-0" for a
# stream's first entry), then each entry's id, type and data. A gateway takes them when
# that "before" is its cursor for the answer; a ring missed (a reconnect) only delays:
# every relayed answer is read again at least once a second. JSON because Lua's cjson
# encodes in C: the netstrings (`<length>:<bytes>`) built in Lua before cost Valkey
# ~3.6 us for one entry's message, cjson ~0.5 (measured in a script's loop), and the
# gateway parses it with orjson instead of a loop in Python.
#
# "Before" is the record's `tail`, the last entry a script added to the stream, not the
# writer's previous id: an entry added in between by a write with no id (Redis chose it)
# would otherwise be jumped over by a gateway whose cursor stood at the writer's previous
# entry. (Reading the stream's entry before instead, an XREVRANGE, cost Valkey ~2.2 us a
# call; the field ~0.2.) The entries one call adds to a stream follow each other there: a
# script runs alone. An entry added outside the scripts (an XADD by hand) is not in
# `tail`: a ring may then name the entry before it as the one before, and a gateway whose
# cursor stands there misses the hand's entry until it reads the answer again (a reload);
# see docs/redis.md.
_RING = """
local ring, rung = {}, {}
-- The entry `id` (field/value pairs ARGV[first..upto]) was just added to `key`, after the
-- entry `prior` ("" when unknown).
local function rang(key, prior, id, first, upto)
  if ARGV[1] == '' then return end
  local r = rung[key]
  if r == false then return end
  local whole = upto == first + 3 and ARGV[first] == 'type' and ARGV[first + 2] == 'data'
  if r == nil then
    ring[#ring + 1] = key
    rung[key] = (whole and prior ~= '') and {key, prior, id, ARGV[first + 1], ARGV[first + 3]}
      or false
  elseif whole then
    r[#r + 1] = id
    r[#r + 1] = ARGV[first + 1]
    r[#r + 1] = ARGV[first + 3]
  else
    rung[key] = false
  end
end
local function ring_out()
  if #ring == 0 then return end
  local out = {}
  for i, key in ipairs(ring) do out[i] = rung[key] or {key} end
  redis.call('PUBLISH', ARGV[1], cjson.encode(out))
end
"""

# The entry a write follows in its stream, from the record: its `tail` (the last entry a
# script added; see _RING) while no writer that does not keep it (a version before
# 2026-12-01, afternoon) has written since, i.e. while it is not before the record's
# last_entry_id; "0-0" for a stream's first entry; else "" (unknown).
_TAIL = """
local function prior_of(stream, tail, last)
  if tail then
    if tail == last or last == '' or after(tail, last) then return tail end
    return ''
  end
  if redis.call('XLEN', stream) == 1 then return '0-0' end
  return ''
end
"""

# A numbered write carries the id its worker chose and the id of the worker's previous
# entry ("prev"); the record's last_entry_id is the last one applied. Equal: the write
# follows on and is applied. The new id not past it: a write sent again, applied already.
# Else the stream ends before the writer's previous entry: a failover lost acknowledged
# writes, and the script says where the stream ends instead of writing.
#
# One write: the entry's field/value pairs are ARGV[first..upto]; id "" lets Redis choose
# (no checks). Returns 0 when fenced, {id, cancel flag} when written (now or before),
# {"", cancel flag, last id} when behind, and {"", cancel flag, last id, "refused"} when
# the stream already holds a later id this writer does not know.
_APPEND_ONE = (
    _AFTER
    + _TAIL
    + """
local fresh = false  -- whether the last append added an entry just now
local prior = ''  -- then, the entry it follows in the stream ("" when unknown)
local function append(stream, record, epoch, maxlen, id, prev, first, upto)
  fresh = false
  local rec = redis.call('HMGET', record, 'epoch', 'cancel', 'last_entry_id', 'tail')
  if (rec[1] or '0') ~= epoch then return 0 end
  local cancel = rec[2] or ''
  local last = rec[3] or ''
  if id == '' then
    local added = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(ARGV, first, upto))
    prior = prior_of(stream, rec[4], last)
    if rec[1] then redis.call('HSET', record, 'tail', added) end  -- a record's, never made
    fresh = true
    return {added, cancel}
  end
  if last ~= prev then
    if last ~= '' and not after(id, last) then return {id, cancel} end
    return {'', cancel, last}
  end
  local added = redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, id, unpack(ARGV, first, upto))
  if type(added) ~= 'string' then return {'', cancel, last, 'refused'} end
  prior = prior_of(stream, rec[4], last)
  redis.call('HSET', record, 'last_entry_id', id, 'tail', id)
  fresh = true
  return {id, cancel}
end
"""
)

# KEYS: answer stream, record. ARGV: epoch, maxlen, id, after, then the entry's
# field/value pairs. Returns what `append` does. (A cluster's writes: one slot a call.)
_APPEND = (
    _APPEND_ONE + "return append(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 5, #ARGV)"
)

# Many writes in one call (single node): one script run instead of one a write, and one
# ring (see _RING) for all of them. KEYS: each write's answer stream and record. ARGV: the
# doorbell's channel, maxlen, then for each write: epoch, id, after, n, and its n
# field/value strings. Returns each write's reply, in order.
_APPEND_MANY = (
    _APPEND_ONE
    + _RING
    + """
local out, at = {}, 3
for i = 1, #KEYS, 2 do
  local upto = at + 3 + tonumber(ARGV[at + 3])
  local done = append(KEYS[i], KEYS[i + 1], ARGV[at], ARGV[2], ARGV[at + 1], ARGV[at + 2],
    at + 4, upto)
  if fresh then rang(KEYS[i], prior, done[1], at + 4, upto) end
  out[#out + 1] = done
  at = upto + 1
end
ring_out()
return out
"""
)
_APPEND_MANY_SHA = hashlib.sha1(_APPEND_MANY.encode()).hexdigest()
# Writes per script call: a call runs alone on the server, so a long batch is cut in parts.
WRITES_PER_CALL = 100
_MANY_SHA_BULK = bulk(_APPEND_MANY_SHA)
# The start entry and the record's fields (status streaming, model, ...; first_entry_id
# the start's id) in one call, as `append` checks it.
# KEYS: answer stream, record. ARGV: the doorbell's channel (see _RING), epoch, maxlen, id,
# after, n, then n record field/value pairs, then the entry's field/value pairs. Returns
# what `append` does.
_START = (
    _APPEND_ONE
    + _RING
    + """
local n = tonumber(ARGV[6])
local first = 7 + 2 * n
local done = append(KEYS[1], KEYS[2], ARGV[2], ARGV[3], ARGV[4], ARGV[5], first, #ARGV)
if type(done) == 'table' and done[1] ~= '' then
  redis.call('HSET', KEYS[2], 'first_entry_id', done[1], unpack(ARGV, 7, 6 + 2 * n))
  if fresh then
    rang(KEYS[1], prior, done[1], first, #ARGV)
    ring_out()
  end
end
return done
"""
)
# A chunk's field count and names, and the name of its text, as _APPEND_MANY takes them.
_CHUNK_FIELDS = b"".join(bulk(part) for part in ("4", "type", EntryType.CHUNK.value, "data"))

# KEYS: answer stream, record[, request stream, caller's asks]. ARGV: the doorbell's
# channel (see _RING), epoch, maxlen, retention_s, id, after ("*": write after whatever
# the stream holds), n, then n record field/value pairs, then the terminal entry's
# field/value pairs[, then (with the request stream) the request's entry id, the question
# id]. Returns 0 when fenced, {id} when written (now or before), {"", last id} when behind
# (see _APPEND). Written, the request is acknowledged and deleted (single node: a
# cluster's request stream has a slot of its own) and the question leaves its caller's
# asks.
_FINISH = (
    _AFTER
    + _TAIL
    + _RING
    + """
local tail = KEYS[3] and 2 or 0  -- the request's id and the question's, at ARGV's end
local function finish()
local rec = redis.call('HMGET', KEYS[2], 'epoch', 'last_entry_id', 'tail')
if (rec[1] or '0') ~= ARGV[2] then return 0 end
local id, last = ARGV[5], rec[2] or ''
if id ~= '' then
  if last ~= '' and not after(id, last) then return {id} end
  if ARGV[6] ~= '*' and last ~= ARGV[6] then return {'', last} end
end
local n = tonumber(ARGV[7])
local from, upto = 8 + 2 * n, #ARGV - tail
local added = false
if id ~= '' then
  added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], id, unpack(ARGV, from, upto))
end
if type(added) ~= 'string' then
  added = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, from, upto))
end
local prior = prior_of(KEYS[1], rec[3], last)
redis.call('HSET', KEYS[2], 'last_entry_id', added, 'tail', added, unpack(ARGV, 8, 7 + 2 * n))
redis.call('HDEL', KEYS[2], 'cancel')
rang(KEYS[1], prior, added, from, upto)
ring_out()
if tonumber(ARGV[4]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return {added}
end
local done = finish()
if KEYS[3] and type(done) == 'table' and done[1] ~= '' then
  local request = ARGV[#ARGV - 1]
  if request ~= '' then
    redis.call('XACK', KEYS[3], 'WORKER_GROUP', request)
    redis.call('XDEL', KEYS[3], request)
  end
  if ARGV[#ARGV] ~= '' then redis.call('ZREM', KEYS[4], ARGV[#ARGV]) end
end
return done
""".replace("WORKER_GROUP", WORKER_GROUP)
)

# A new epoch, and the id the new writer's chain starts after: the record's last_entry_id,
# or the stream's last entry when no numbered write set it.
_BEGIN_FN = """
local function begin(record, stream)
  local epoch = redis.call('HINCRBY', record, 'epoch', 1)
  local last = redis.call('HGET', record, 'last_entry_id')
  if not last then
    local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
    last = top[1] and top[1][1] or ''
    if last ~= '' then redis.call('HSET', record, 'last_entry_id', last) end
  end
  return epoch, last
end
"""

# KEYS: record, answer stream. Returns {epoch, last id}.
_BEGIN = _BEGIN_FN + "local epoch, last = begin(KEYS[1], KEYS[2])\nreturn {epoch, last}\n"

# KEYS: record, answer stream. What a worker taking a request needs, in one round trip: the
# record ({} when gone) and, while its answer is still to give (queued, streaming), a new
# epoch and the id its writes start after: {record's field/value list[, epoch, last id]}.
_OPEN = (
    _BEGIN_FN
    + """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return {} end
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= 'queued' and status ~= 'streaming' then return {h} end
local epoch, last = begin(KEYS[1], KEYS[2])
return {h, epoch, last}
"""
)


@dataclass(frozen=True, slots=True)
class Put:
    """One write to an answer stream. A numbered write (`entry_id` set, chosen by the
    worker) names the id of its writer's previous entry (`after`): sent twice, it is
    applied once; sent to a stream that lost entries, it is refused and says so."""

    question_id: str
    entry: Entry
    epoch: int = 0
    entry_id: str = ""  # "": Redis chooses (no retry protection)
    after: str = ""
    check_cancel: bool = True


@dataclass(frozen=True, slots=True)
class Applied:
    """What became of a Put. `entry_id` None: not written, because another delivery holds
    the answer (fenced), or the stream ends at `behind`, before the write's `after` (a
    failover lost acknowledged writes), or (`refused`) it holds a later id the writer does
    not know."""

    entry_id: str | None
    cancel: bool = False
    behind: str | None = None
    refused: bool = False


def _applied(put: Put, result: Any) -> Applied:
    if not result:
        return Applied(None)
    cancel = put.check_cancel and result[1] == "1"
    if result[0]:
        return Applied(str(result[0]), cancel)
    return Applied(None, cancel, str(result[2]), len(result) > 3)


# (question id, entry, read the cancel flag?[, epoch])
Write = tuple[str, Entry, bool] | tuple[str, Entry, bool, int]


class Answers(StoreBase):
    group: RequestGroup

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._append = self.redis.register_script(_APPEND)
        self._finish = self.redis.register_script(_FINISH)
        self._start = self.redis.register_script(_START)
        self._begin = self.redis.register_script(_BEGIN)
        self._open = self.redis.register_script(_OPEN)
        # The channel the writes ring (see _RING); none in a cluster (its readers re-arm).
        self._doorbell = "" if is_cluster(self.redis) else self.keys.written

    # -- reading ----------------------------------------------------------

    async def read(
        self, question_id: str, after: str = "0-0", count: int = XRANGE_PAGE
    ) -> list[Entry]:
        """Up to `count` entries strictly after the cursor `after`. On a single node sent with
        the other commands of the moment (a burst's viewers each read their answer's history
        first: 100 of them queued for the pool's 8 connections, wave after wave)."""
        key, start = self.keys.answer(question_id), exclusive(after)
        if self._together is None:
            raw: Any = await self.redis.xrange(key, start, "+", count=count)
            return [Entry.from_fields(entry_id, fields) for entry_id, fields in raw]
        flat: Any = await self._together.command("XRANGE", key, start, "+", "COUNT", count)
        return [Entry.from_flat(entry_id, fields) for entry_id, fields in flat]

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
        epoch, _ = await self.begin_answer(question_id)
        return epoch

    async def begin_answer(self, question_id: str) -> tuple[int, str]:
        """This delivery's epoch, and the entry id its numbered writes start after."""
        keys = [self.keys.question(question_id), self.keys.answer(question_id)]
        epoch, last = await self._begin(keys=keys)
        return int(epoch), str(last)

    async def open_answer(self, question_id: str) -> tuple[QuestionRecord, int, str] | None:
        """`record` and `begin_answer` in one round trip: the record, and, while its answer
        is still to give (queued or streaming), this delivery's epoch and the id its writes
        start after (else 0 and "": nothing begun). None when the record is gone."""
        keys = [self.keys.question(question_id), self.keys.answer(question_id)]
        reply = await self._script(self._open, keys, [])
        if not reply:
            return None
        flat = reply[0]
        record = QuestionRecord.from_hash(
            question_id, dict(zip(flat[::2], flat[1::2], strict=True))
        )
        if len(reply) == 1:
            return record, 0, ""
        return record, int(reply[1]), str(reply[2])

    async def start(
        self,
        request: QuestionRequest,
        entry: Entry,
        fields: dict[str, str],
        epoch: int = 0,
        *,
        entry_id: str = "",
        after: str = "",
    ) -> str:
        """Write the `start` entry (numbered when `entry_id` is given) and mark the record
        streaming, in one call (with the other starts of the moment: a burst's)."""
        keys = [self.keys.answer(request.id), self.keys.question(request.id)]
        args: list[str | int] = [
            self._doorbell,
            epoch,
            self.limits.answer_maxlen,
            entry_id,
            after,
            len(fields),
        ]
        args += itertools.chain.from_iterable(fields.items())
        args += itertools.chain.from_iterable(entry.fields().items())
        reply = await self._script(self._start, keys, args)
        put = Put(request.id, entry, epoch, entry_id, after, False)
        return _written(request.id, _applied(put, reply))

    async def append(self, question_id: str, entry: Entry, epoch: int = 0) -> str:
        (done,) = await self.write_batch([Put(question_id, entry, epoch, check_cancel=False)])
        return _written(question_id, done)

    async def append_batch(self, batch: Sequence[Write]) -> list[tuple[str | None, bool]]:
        """Append (question id, entry, read the cancel flag? [, epoch]) in one pipeline, ids
        chosen by Redis; for each, (its entry id, or None when the epoch is no longer
        current; whether a cancel was asked for — False where not read). No epoch means 0:
        an answer no delivery has begun (written by a tool or a test)."""
        puts = [
            Put(qid, entry, epoch[0] if epoch else 0, "", "", check)
            for qid, entry, check, *epoch in batch
        ]
        return [(a.entry_id, a.cancel) for a in await self.write_batch(puts)]

    def lane(self) -> Lane | None:
        """A connection of its own for a sender of many `write_batch` calls (a worker's
        chunk writer; named as the pool's, plus "-write"), or None where writes go through
        the client (a cluster)."""
        return own_lane(self.redis, "-write")

    async def write_batch(self, puts: Sequence[Put], lane: Lane | None = None) -> list[Applied]:
        """Every write in one round trip, each checked in Redis (epoch, order, cancel flag):
        on a single node a script call a WRITES_PER_CALL writes, sent on `lane` (else on a
        pool connection); in a cluster, a pipeline of one script call a write."""
        if not puts:
            return []
        if is_cluster(self.redis):
            results = await self._pipelined(puts)
            return [_applied(put, result) for put, result in zip(puts, results, strict=True)]
        payload, calls = self.packed_writes(puts)
        replies = await call_packed(self.redis, payload, calls, lane)
        if any(isinstance(reply, NoScriptError) for reply in replies):
            # Redis lost its scripts (a restart, SCRIPT FLUSH): none of these calls ran.
            await self.redis.script_load(_APPEND_MANY)
            replies = await call_packed(self.redis, payload, calls, lane)
        return self.applied(puts, replies)

    def applied(self, puts: Sequence[Put], replies: list[Any]) -> list[Applied]:
        """What each of `puts` came to, from the replies to `packed_writes(puts)` (an error
        reply raised)."""
        results: list[Any] = []
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
            results += reply
        return [_applied(put, result) for put, result in zip(puts, results, strict=True)]

    def packed_writes(self, puts: Sequence[Put]) -> tuple[bytes, int]:
        """Single node: `puts` as `write_batch` sends them, and the number of replies:
        EVALSHA _APPEND_MANY, WRITES_PER_CALL writes a call, packed by hand (redis-py packs a
        command an argument at a time: a third of the worker's write cost)."""
        commands: list[bytes] = []
        maxlen = bulk(str(self.limits.answer_maxlen))
        doorbell = bulk(self._doorbell)
        for at in range(0, len(puts), WRITES_PER_CALL):
            part = puts[at : at + WRITES_PER_CALL]
            keys: list[bytes] = []
            args: list[bytes] = [doorbell, maxlen]
            count = 2  # the arguments in `args` (one of its items may hold several)
            for put in part:
                keys += (
                    bulk(self.keys.answer(put.question_id)),
                    bulk(self.keys.question(put.question_id)),
                )
                args += (bulk(str(put.epoch)), bulk(put.entry_id), bulk(put.after))
                if put.entry.type is EntryType.CHUNK:  # most writes: the fields' names as bytes
                    args += (_CHUNK_FIELDS, bulk(put.entry.text))
                    count += 8
                    continue
                fields = put.entry.fields()
                args.append(bulk(str(2 * len(fields))))
                for name, value in fields.items():
                    args += (bulk(name), bulk(value))
                count += 4 + 2 * len(fields)
            head = b"*%d\r\n$7\r\nEVALSHA\r\n%b%b" % (
                3 + len(keys) + count,
                _MANY_SHA_BULK,
                bulk(str(len(keys))),
            )
            commands += (head, *keys, *args)
        return b"".join(commands), -(-len(puts) // WRITES_PER_CALL)

    async def _pipelined(self, puts: Sequence[Put]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for put in puts:
                args: list[str | int] = [
                    put.epoch,
                    self.limits.answer_maxlen,
                    put.entry_id,
                    put.after,
                    *itertools.chain.from_iterable(put.entry.fields().items()),
                ]
                keys = [self.keys.answer(put.question_id), self.keys.question(put.question_id)]
                await self._append(keys=keys, args=args, client=pipe)
            results: list[Any] = await pipe.execute()
        return results

    async def finish(
        self,
        question_id: str,
        entry: Entry,
        fields: dict[str, Any],
        request_entry_id: str | None,
        caller: str = "",
        epoch: int = 0,
        *,
        entry_id: str = "",
        after: str = "",
    ) -> str:
        """Write the terminal entry, close the record, set retention (in one script, fenced
        by `epoch`; numbered as `start` is, `after` "*" to follow whatever the stream holds),
        then ack the request and free the question's place in its caller's cap. Raises
        Rewound, writing nothing, when the stream ends before `after`."""
        record = {
            **{k: str(v) for k, v in fields.items()},
            RecordField.STATUS: STATUS_OF_TERMINAL[entry.type].value,
            "ended_ms": str(now_ms()),
        }
        args: list[str | int] = [
            self._doorbell,
            epoch,
            self.limits.answer_maxlen,
            self.limits.retention_s,
            entry_id,
            after,
            len(record),
            *itertools.chain.from_iterable(record.items()),
            *itertools.chain.from_iterable(entry.fields().items()),
        ]
        keys = [self.keys.answer(question_id), self.keys.question(question_id)]
        single = not is_cluster(self.redis)
        if single:  # the request's ack and the caller's place, in the same call
            shard, request = split_request_id(request_entry_id or "")
            keys += (self.group.streams[shard], self.keys.caller_asks(caller))
            args += (request, question_id if caller else "")  # "" for either: nothing to free
        result = await self._script(self._finish, keys, args)
        if not result:
            raise Fenced(f"question {question_id}: another worker has taken over its answer")
        if not result[0]:
            raise Rewound(
                f"question {question_id}: its stream ends at {result[1]!r}, before {after!r}",
                str(result[1]),
            )
        if not single and request_entry_id is not None:
            await self.group.ack(request_entry_id)
        if not single and caller:
            await self.redis.zrem(self.keys.caller_asks(caller), question_id)
        return str(result[0])


def _written(question_id: str, done: Applied) -> str:
    if done.entry_id is not None:
        return done.entry_id
    if done.behind is None:
        raise Fenced(f"question {question_id}: another worker has taken over its answer")
    raise Rewound(f"question {question_id}: its stream ends at {done.behind!r}", done.behind)
