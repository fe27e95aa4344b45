"""The per-process multiplexed reader: one reading connection for every watched answer.

However many viewers a gateway has, it holds one reading connection (in cluster mode,
one per shard, see below). On a single node that connection listens to the doorbell, a
Pub/Sub channel (`Keys.written`): every write of answer entries publishes which answer
streams it added to, with the entries themselves where it can (store/answers.py, _RING).
An entry that follows on from the gateway's cursor for its answer is handed over from the
message; an answer named without its entries, or whose entries do not follow on, is due:
read from its cursor with an XREAD of just the answers due, on the pool. Listening costs
no command per wake: a blocking XREAD over every relayed answer cost Valkey O(answers)
each time it re-armed, about once per entry, and a blocking read of a doorbell stream
one round trip per wake. A new answer is due at once; every answer relayed is read again
at least every SWEEP_S, so a ring that was missed (a reconnect, an older worker that does
not ring) only delays its entries. Entries fan out in memory to bounded per-viewer
buffers; a viewer that falls behind is not queued for without end: it is told it
overflowed and catches up from the stream itself (XRANGE).

Cluster mode: a command may only name keys of one hash slot, even on one node (CROSSSLOT),
so one XREAD cannot cover answers of several slots. Answers live in their shard's slot
(`keys.py`), and the relay runs one reader per shard it watches answers of, each on a
connection of its own to the node serving that slot: at most TOKENRELAY_REQUEST_SHARDS
reading connections, whatever the number of viewers. A reader told MOVED, or cut off
(a failover), learns the cluster's new layout and reconnects to the slot's new node.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import hiredis
import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError, SlotNotCoveredError

from tokenrelay import metrics
from tokenrelay.connection import (
    BLOCK_MARGIN_S,
    TakenOver,
    as_cluster,
    bulk,
    call_packed,
    node_client,
    pack,
    send_packed,
)
from tokenrelay.pacing import Backoff, wait_set
from tokenrelay.store import XRANGE_PAGE, Store
from tokenrelay.wire import Entry, EntryType, entry_id_after

log = logging.getLogger(__name__)

XREAD_COUNT = 512
# Re-arming the read over n answers costs Valkey and this process O(n) each time, and the
# reads follow each other as fast as entries come: at 1,000 answers x 20 tokens/s that was
# ~2,000 re-arms a second. At least this long per watched answer between two re-arms
# (2 ms at 1,000 answers, 0.2 ms at 100) lets entries gather instead.
REARM_PER_KEY_S = 2e-6
SWEEP_S = 1.0
# A reading connection that failed is tried again after this, doubling up to the most.
RETRY_FIRST_S = 0.05
RETRY_MOST_S = 2.0
# A viewer that stops reading keeps what it was handed alive: its catch-up page and its
# live buffer. Both are bounded by the text they hold, not only by entries (500 entries of
# 5 KB held 2.7 MB per stalled SSE reader).
PAGE_BYTES = 64 * 1024
BUFFER_BYTES = 1024 * 1024
FIRST_PAGE = 8
ENTRY_OVERHEAD_BYTES = 100  # an Entry and its event's other fields, roughly


def _size(entries: list[Entry]) -> int:
    return sum(len(e.text) for e in entries) + ENTRY_OVERHEAD_BYTES * len(entries)


class _PageSize:
    """How many entries the next catch-up XRANGE asks for: as many as fit in PAGE_BYTES at
    the sizes seen so far (XRANGE counts entries, not bytes), from 1 to XRANGE_PAGE."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = FIRST_PAGE

    def seen(self, page: list[Entry]) -> None:
        if page:
            per_entry = _size(page) / len(page)
            self.count = max(1, min(XRANGE_PAGE, int(PAGE_BYTES // per_entry)))


class _ReadSet:
    """The answers the shared XREAD covers: each key's cursor, and the command packed.

    redis-py packs a command's arguments one by one in Python: re-arming over 1,000 keys
    cost the gateway 1.8 ms of CPU each time (py-spy: `pack_command`, `Encoder.encode`).
    Here a key is packed once when it joins and a cursor when it moves; a re-arm only
    joins the keys (joined again only when one joins or leaves) and the cursors.
    """

    def __init__(self) -> None:
        self.cursors: dict[str, str] = {}  # answer key -> last entry id read
        self._keys: dict[str, bytes] = {}  # answer key -> the key packed
        self._marks: dict[str, bytes] = {}  # answer key -> its cursor packed
        self._all_keys = b""  # every key packed, in order; rebuilt when one joins or leaves

    def __bool__(self) -> bool:
        return bool(self.cursors)

    def __len__(self) -> int:
        return len(self.cursors)

    def set(self, key: str, cursor: str) -> None:
        if key not in self._keys:
            self._keys[key] = bulk(key)
            self._all_keys = b"".join(self._keys.values())
        self._marks[key] = bulk(cursor)
        self.cursors[key] = cursor

    def remove(self, key: str) -> None:
        del self.cursors[key]
        del self._keys[key]
        del self._marks[key]
        self._all_keys = b"".join(self._keys.values())

    def command(self, count: int, block_ms: int, first: tuple[str, str] | None = None) -> bytes:
        """XREAD BLOCK over every key (after `first`, a key and its cursor, when given)."""
        key, mark = (bulk(first[0]), bulk(first[1])) if first else (b"", b"")
        head = b"*%d\r\n$5\r\nXREAD\r\n$5\r\nCOUNT\r\n%b$5\r\nBLOCK\r\n%b$7\r\nSTREAMS\r\n" % (
            6 + 2 * (len(self._keys) + (first is not None)),
            bulk(str(count)),
            bulk(str(block_ms)),
        )
        return b"".join((head, key, self._all_keys, mark, b"".join(self._marks.values())))

    def command_for(self, keys: list[str], count: int) -> bytes:
        """A non-blocking XREAD of `keys` (each in the set) from their cursors."""
        head = b"*%d\r\n$5\r\nXREAD\r\n$5\r\nCOUNT\r\n%b$7\r\nSTREAMS\r\n" % (
            4 + 2 * len(keys),
            bulk(str(count)),
        )
        return b"".join((head, *(self._keys[k] for k in keys), *(self._marks[k] for k in keys)))


Direct = Callable[[list[Entry]], bool]


class Subscription:
    """A viewer's bounded buffer of live entries for one answer.

    While its viewer waits for entries with nothing buffered, `direct` (when the viewer
    has one) is given the new entries as they are read, in the read's own callback: the
    viewer's socket is written without waking its task. `direct` says False, writing
    nothing, when it cannot write now; the entries are then buffered, and so is all that
    follows until the task has taken them: order is kept."""

    __slots__ = (
        "_bytes",
        "_limit",
        "buffer",
        "direct",
        "ended",
        "key",
        "last",
        "overflowed",
        "ready",
    )

    def __init__(self, key: str, limit: int) -> None:
        self.key = key
        self._limit = limit
        self._bytes = 0
        self.buffer: deque[Entry] = deque()
        self.overflowed = False
        self.ready = asyncio.Event()
        self.direct: Direct | None = None
        self.last = ""  # the last entry the viewer was given (or written directly)
        self.ended = False  # the terminal entry was written directly

    def push(self, entries: list[Entry]) -> None:
        if self.overflowed:
            return
        direct = self.direct
        if direct is not None and not self.buffer:
            batch = _fresh(entries, self.last)
            if not batch:
                return
            try:
                written = direct(batch)
            except Exception:  # before anything is written: its task writes them instead
                log.exception("relay: a direct write to a viewer failed; its task writes")
                self.direct = written = None
            if written:
                _count(batch)
                self.last = batch[-1].entry_id
                if batch[-1].terminal:
                    self.ended = True
                    self.direct = None
                    self.ready.set()
                return
        size = _size(entries)
        if len(self.buffer) + len(entries) > self._limit or self._bytes + size > BUFFER_BYTES:
            # Drop rather than grow: the viewer re-reads these from Redis.
            self.buffer.clear()
            self._bytes = 0
            self.overflowed = True
        else:
            self.buffer.extend(entries)
            self._bytes += size
        self.ready.set()

    def take(self) -> list[Entry]:
        """Every entry waiting, at once: the viewer writes them in one go."""
        entries = list(self.buffer)
        self.buffer.clear()
        self._bytes = 0
        return entries


class _Reader:
    """The read of one shard's watched answers (single node: of every answer): the doorbell
    heard and the answers due read (single node, see the module's docstring); a blocking
    read over all of them, re-armed when keys join (cluster)."""

    def __init__(self, relay: Relay, tag: str, client: Redis | None) -> None:
        self._relay = relay
        self.tag = tag
        self._client = client  # single node: the caller's, never closed here
        self._own_client: Redis | None = None  # cluster: opened here, to the slot's node
        self._node: ClusterNode | None = None
        self.read = _ReadSet()
        self._doorbell = relay.store.keys.written if client is not None else None
        self._due: set[str] = set()  # keys to read at the next turn (doorbell mode)
        self._due_now = asyncio.Event()  # set when a key becomes due
        self._bell: _Doorbell | None = None  # single node: the subscribed connection, while up
        self._backoff = Backoff(RETRY_FIRST_S, RETRY_MOST_S)  # the doorbell's reconnects
        self.version = 0  # bumps whenever a key joins the read
        self._armed_version = -1
        self.has_keys = asyncio.Event()
        self._reader_id: int | None = None  # cluster: the blocked read's, to CLIENT UNBLOCK
        self._waking: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.rearms = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"tokenrelay-relay{self.tag}")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, self._waking) if t is not None]
        self._task = self._waking = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._disconnect()

    def add(self, key: str, cursor: str) -> None:
        self.read.set(key, cursor)
        self.version += 1
        self.has_keys.set()
        if self._doorbell is not None:
            self._due.add(key)
            self._due_now.set()
        else:
            self.wake()

    def wake(self) -> None:
        if self._waking is None or self._waking.done():
            self._waking = asyncio.create_task(self._unblock_reader(), name="tokenrelay-wake")

    async def _unblock_reader(self) -> None:
        """CLIENT UNBLOCK until the read has re-armed with the current key set."""
        store = self._relay.store
        while self._armed_version < self.version and self._task is not None:
            reader_id = self._reader_id
            unblocked = 0
            if reader_id is not None:
                try:
                    if self._node is not None:  # the node the read blocks on
                        unblocked = await store.redis.execute_command(  # type: ignore[no-untyped-call]
                            "CLIENT UNBLOCK", reader_id, target_nodes=self._node
                        )
                    else:
                        unblocked = await store.redis.client_unblock(reader_id)
                except RedisError:
                    unblocked = 0
            # Unblocked: give it a moment to re-arm. Not blocked yet (between reads): it may
            # still be sending the old key set, so try again shortly.
            await asyncio.sleep(0.0005 if unblocked else 0.001)

    async def _connection(self, key: str) -> Redis:
        if self._client is not None:
            return self._client
        if self._own_client is None:
            cluster = as_cluster(self._relay.store.redis)
            node = cluster.get_node_from_key(key)
            if node is None:
                raise SlotNotCoveredError(f"no node serves {key}'s slot yet")
            self._node = node
            self._own_client = node_client(
                node, name="tokenrelay-gateway-read", block_ms=self._relay.block_ms
            )
        return self._own_client

    async def _disconnect(self) -> None:
        client, self._own_client = self._own_client, None
        self._node = None
        if client is not None:
            await client.aclose()

    async def _relocate(self, error: Exception) -> None:
        """Cluster: the slot moved, or its node went away; learn the layout anew."""
        if self._client is not None:
            return
        await self._disconnect()
        cluster = as_cluster(self._relay.store.redis)
        try:
            await cluster.nodes_manager.initialize()
        except RedisError as e:
            log.warning("relay: cannot refresh the cluster's layout (%s)", e)
        log.warning("relay: reader for shard %s reconnects (%s)", self.tag, error)

    async def _run(self) -> None:
        """The read loop, started again after anything unexpected: every viewer of every
        answer on this gateway depends on it."""
        while True:
            try:
                await self._read_loop()
            except Exception:
                log.exception("relay: the shared read failed unexpectedly; starting it again")
                self._reader_id = None
                await asyncio.sleep(0.1)

    async def _read_loop(self) -> None:
        if self._client is not None and self._doorbell is not None:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._listen(self._client, self._doorbell))
                group.create_task(self._read_due_loop())
            return
        backoff = Backoff(RETRY_FIRST_S, RETRY_MOST_S)
        loop = asyncio.get_running_loop()
        armed_at = 0.0
        while True:
            await self._until_keys()
            try:
                reader = await self._connection(next(iter(self.read.cursors)))
                if self._reader_id is None:
                    self._reader_id = int(await reader.client_id())
                pause_s = armed_at + len(self.read) * REARM_PER_KEY_S - loop.time()
                if pause_s > 0:
                    await asyncio.sleep(pause_s)
                armed_at = loop.time()
                self._armed_version = self.version
                streams = dict(self.read.cursors)
                if not streams:  # the last viewer left while we asked for our client id
                    continue
                self.rearms += 1
                reply = await self._xread(
                    reader, self.read.command(XREAD_COUNT, self._relay.block_ms)
                )
            except (RedisError, OSError) as e:
                self._reader_id = None
                log.warning("relay: Redis read failed (%s); retrying in %.2fs", e, backoff.delay_s)
                await self._relocate(e)  # cluster: MOVED, or the node went away
                await backoff.sleep()
                continue
            backoff.reset()
            if self._hand_over(reply, streams):
                await _viewers_first()

    async def _until_keys(self) -> None:
        """Wait while no answer is relayed."""
        while not self.read:
            self.has_keys.clear()
            await self.has_keys.wait()

    async def _listen(self, client: Redis, doorbell: str) -> None:
        """Single node: hear the doorbell on the reader's own connection, from the first
        answer relayed on; once subscribed (again), every relayed answer is due.

        redis-py opens the connection (address, TLS, AUTH, HELLO, name); its transport is
        then handed to a `_Doorbell`, which reads every message in the I/O callback. Read
        through redis-py's `read_response`, a message cost ~70-90 us of this process's CPU
        at one a millisecond (a timeout context, the StreamReader's wake-up, the parser's
        coroutines); fed to hiredis in `data_received`, ~32 (a throwaway probe, one
        subscriber, the machine's Redis)."""
        await self._until_keys()
        while True:
            if client.connection is None:
                await client.initialize()
            conn = client.connection
            assert conn is not None  # a single-connection client has one once initialised
            try:
                if not conn.is_connected:
                    await conn.connect()  # type: ignore[no-untyped-call]
                bell = self._bell = _Doorbell(self, conn)
                bell.send(pack(["SUBSCRIBE", doorbell]))
                raise await bell.lost
            except (RedisError, OSError) as e:
                await conn.disconnect()
                log.warning(
                    "relay: the doorbell's connection failed (%s); again in %.2fs",
                    e,
                    self._backoff.delay_s,
                )
                await self._backoff.sleep()
            except BaseException:
                await conn.disconnect()  # the taken-over transport is redis-py's to close
                raise
            finally:
                self._bell = None

    def _heard(self, reply: Any) -> None:
        """One reply on the doorbell's connection (`_Doorbell`): a ring, the subscription's
        confirmation, or a PING's reply."""
        if isinstance(reply, list) and len(reply) >= 3:
            if reply[0] == b"message":
                self._rang(reply[2])
            elif reply[0] == b"subscribe":  # what was written before is read now
                self._due.update(self.read.cursors)
                self._due_now.set()
                self._backoff.reset()

    def _rang(self, message: bytes) -> None:
        """A ring (store/answers.py, _RING): an answer's entries that follow on from its
        cursor are handed over; any other relayed answer it names is due."""
        cursors = self.read.cursors
        if not cursors:
            return
        try:
            rings = orjson.loads(message)
            if not isinstance(rings, list) or not all(_is_ring(r) for r in rings):
                raise ValueError("not a list of rings")
        except ValueError as e:  # orjson's JSONDecodeError is one
            log.warning("relay: a doorbell message that cannot be read (%s); reading all", e)
            self._due.update(cursors)
            self._due_now.set()
            return
        due = False
        for ring in rings:
            key = ring[0]
            last = cursors.get(key)
            if last is None:  # not relayed here
                continue
            if len(ring) < 5 or ring[1] != last:
                self._due.add(key)
                due = True
                continue
            raw: list[list[Any]] = [
                [ring[i], ["type", ring[i + 1], "data", ring[i + 2]]]
                for i in range(2, len(ring) - 2, 3)
            ]
            self.read.set(key, raw[-1][0])
            entries = _readable(key, raw)
            if entries:
                self._relay.deliver(key, entries)
        if due:
            self._due_now.set()

    async def _read_due_loop(self) -> None:
        """Single node: read the answers due (joined, named by a ring that did not carry
        their entries, or all of them every SWEEP_S) from their cursors, on the pool."""
        loop = asyncio.get_running_loop()
        redis = self._relay.store.redis
        swept_at = loop.time()
        backoff = Backoff(RETRY_FIRST_S, RETRY_MOST_S)
        while True:
            await self._until_keys()
            wait_s = swept_at + SWEEP_S - loop.time()
            if not self._due and wait_s > 0:
                await wait_set(self._due_now, wait_s)
            now = loop.time()
            if now - swept_at >= SWEEP_S:
                swept_at = now
                self._due.update(self.read.cursors)
                self._ping_when_quiet(now)
            cursors = self.read.cursors
            streams = {key: cursors[key] for key in self._due if key in cursors}
            self._due.clear()
            if not streams:
                continue
            self.rearms += 1
            try:
                command = self.read.command_for(list(streams), XREAD_COUNT)
                (reply,) = await call_packed(redis, command, 1)
                if isinstance(reply, Exception):
                    raise reply
            except (RedisError, OSError) as e:
                self._due.update(streams)
                log.warning("relay: Redis read failed (%s); retrying in %.2fs", e, backoff.delay_s)
                await backoff.sleep()
                continue
            backoff.reset()
            self._hand_over(reply, streams)
            for key, raw in reply.items() if isinstance(reply, dict) else reply or ():
                if len(raw) >= XREAD_COUNT:  # more to read than one reply holds
                    self._due.add(key)

    def _ping_when_quiet(self, now: float) -> None:
        """A PING on the doorbell's connection when it brought nothing for a block's time,
        and the connection dropped when not even that PING's reply came within the margin
        a blocking read has (BLOCK_MARGIN_S): a dead server or a cut connection, not a
        quiet one. The listener then connects again."""
        bell = self._bell
        if bell is None:
            return
        quiet_s = now - bell.heard_at
        block_s = self._relay.block_ms / 1000
        if quiet_s >= block_s + BLOCK_MARGIN_S:
            log.warning(
                "relay: the doorbell's connection is silent for %.0fs; reconnecting", quiet_s
            )
            bell.abort()
        elif quiet_s >= block_s and now - bell.pinged_at >= block_s:
            bell.pinged_at = now
            bell.send(_PING)

    def _hand_over(self, reply: Any, streams: dict[str, str]) -> bool:
        """Move the cursors past the entries read and hand them to the viewers; False when
        the read brought nothing."""
        delivered = False
        for key, raw in reply.items() if isinstance(reply, dict) else reply or ():
            # A key dropped and re-added meanwhile has a new cursor: the next read serves it.
            if not raw or self.read.cursors.get(key) != streams[key]:
                continue
            self.read.set(key, raw[-1][0])
            entries = _readable(key, raw)
            if entries:
                self._relay.deliver(key, entries)
                delivered = True
        return delivered

    @staticmethod
    async def _xread(reader: Redis, command: bytes) -> Any:
        """Send a packed XREAD on the reader's own connection; the raw reply (RESP2: a list
        of [key, [[id, [field, value, ...]], ...]]; RESP3: the same as a map)."""
        if reader.connection is None:
            await reader.initialize()
        conn = reader.connection
        assert conn is not None  # a single-connection client has one once initialised
        try:
            await send_packed(conn, command)
            response = await conn.read_response()  # within the client's socket timeout
        except BaseException:
            await conn.disconnect()  # a half-read reply must not be taken for the next one
            raise
        if isinstance(response, ResponseError):  # the parser hands error replies back
            raise response
        return response


_PING = pack(["PING"])


class _Doorbell(TakenOver):
    """The doorbell's subscribed connection, taken over from redis-py once it is open: each
    reply is parsed by hiredis as its bytes arrive and handed to the reader at once
    (`_Reader._heard`), in the I/O callback. `lost` gives the error the connection ended
    with: closed, or it brought what cannot be read."""

    CLOSED = "the doorbell's connection closed"

    def __init__(self, reader: _Reader, conn: Any) -> None:
        loop = asyncio.get_running_loop()
        self._reader = reader
        self._parse = hiredis.Reader()
        self._time = loop.time
        self.heard_at = self.pinged_at = loop.time()
        self.lost: asyncio.Future[Exception] = loop.create_future()
        super().__init__(conn)

    def send(self, payload: bytes) -> None:
        self._transport.write(payload)

    def abort(self) -> None:
        self._transport.abort()

    def data_received(self, data: bytes) -> None:
        self.heard_at = self._time()
        parse = self._parse
        try:
            parse.feed(data)
            while (reply := parse.gets(False)) is not False:
                if isinstance(reply, hiredis.ReplyError):  # SUBSCRIBE refused (ACL, ...)
                    self._end(RedisConnectionError(f"the doorbell's SUBSCRIBE failed: {reply}"))
                    return
                self._reader._heard(reply)
        except hiredis.ProtocolError as e:
            self._end(RedisConnectionError(str(e)))
        except Exception as e:  # every viewer depends on this read: start it again
            log.exception("relay: a doorbell message failed unexpectedly")
            self._end(RedisConnectionError(f"a doorbell message failed: {e!r}"))

    def _end(self, error: Exception) -> None:
        if not self.lost.done():
            self.lost.set_result(error)
        super()._end(error)


def _is_ring(ring: Any) -> bool:
    """An answer's part of a doorbell message: a list that starts with its key."""
    return isinstance(ring, list) and bool(ring) and isinstance(ring[0], str)


async def _viewers_first() -> None:
    """Cluster: let the viewers write what was just handed to them before the read is sent again:
    the re-arm's packing and send otherwise ran first (~80 us at idle, measured). Twice:
    a viewer's task runs at the first turn; engine.io's writer task, which a Socket.IO
    viewer's packet wakes, at the second."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def _readable(key: str, raw: list[Any]) -> list[Entry]:
    """The entries this version can read; one it cannot (a newer worker's type, an XADD by
    hand) is logged and skipped rather than stopping the read every viewer shares."""
    entries: list[Entry] = []
    for entry_id, flat in raw:
        try:
            entries.append(Entry.from_flat(entry_id, flat))
        except (ValueError, TypeError, KeyError) as e:
            log.warning("relay: skipping entry %s of %s that cannot be read (%s)", entry_id, key, e)
    return entries


class Relay:
    def __init__(
        self, store: Store, reader: Redis | None, *, block_ms: int, buffer_limit: int
    ) -> None:
        """`reader`: the dedicated connection the one XREAD blocks on; None with a cluster
        client, whose readers open their own (one per shard)."""
        self.store = store
        self.block_ms = block_ms
        self._buffer_limit = buffer_limit
        self._single = _Reader(self, "", reader) if reader is not None else None
        self._readers: dict[str, _Reader] = {}
        self._subs: dict[str, set[Subscription]] = {}
        self._started = False

    @property
    def watched(self) -> int:
        return sum(len(r.read) for r in self._all_readers())

    @property
    def viewers(self) -> int:
        return sum(len(s) for s in self._subs.values())

    @property
    def rearms(self) -> int:
        return sum(r.rearms for r in self._all_readers())

    @property
    def readers(self) -> int:
        """Reading connections this relay holds (or will, once its reads arm)."""
        return len(self._readers) if self._single is None else 1

    def lags(self) -> list[int]:
        """Per live viewer, entries read but not yet taken (an overflowed one: the limit)."""
        subs = [s for group in self._subs.values() for s in group]
        return [self._buffer_limit if s.overflowed else len(s.buffer) for s in subs]

    def _all_readers(self) -> list[_Reader]:
        return [self._single] if self._single is not None else list(self._readers.values())

    def start(self) -> None:
        self._started = True
        for reader in self._all_readers():
            reader.start()

    async def stop(self) -> None:
        self._started = False
        await asyncio.gather(*(r.stop() for r in self._all_readers()))

    def _reader_for(self, key: str) -> _Reader:
        if self._single is not None:
            return self._single
        tag = self.store.keys.slot_tag(key)
        reader = self._readers.get(tag)
        if reader is None:
            reader = self._readers[tag] = _Reader(self, tag, None)
            if self._started:
                reader.start()
        return reader

    def deliver(self, key: str, entries: list[Entry]) -> None:
        for sub in self._subs.get(key, ()):
            sub.push(entries)

    # -- viewers ------------------------------------------------------------

    def _subscribe(self, key: str, after: str) -> tuple[Subscription, str]:
        """Register for live entries. Returns the subscription and the read cursor.

        Live delivery covers every entry after the returned cursor, so a viewer
        that has read up to `after` must also XRANGE (after, cursor] itself.
        """
        sub = Subscription(key, self._buffer_limit)
        self._subs.setdefault(key, set()).add(sub)
        reader = self._reader_for(key)
        cursor = reader.read.cursors.get(key)
        if cursor is None:
            cursor = after
            reader.add(key, after)
        return sub, cursor

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[sub.key]
            self._reader_for(sub.key).read.remove(sub.key)  # dropped at its next re-arm

    async def follow(self, question_id: str, after: str = "0-0") -> AsyncIterator[Entry]:
        """Every entry after `after`, in order, once each, until a terminal entry."""
        async for batch in self.batches(question_id, after):
            for entry in batch:
                yield entry

    async def batches(
        self, question_id: str, after: str = "0-0", direct: Direct | None = None
    ) -> AsyncGenerator[list[Entry], None]:
        """`follow`'s entries, each time as many as are ready (never an empty list): what the
        viewer can write at once. The last batch ends with the terminal entry.

        History first (XRANGE), then live entries from the shared read; any live
        entry not after the last one delivered is dropped, so there is no gap at
        the hand-over and no duplicate.

        `direct` (see Subscription): live entries are given to it in the read's callback
        while the viewer waits with nothing buffered, and are not yielded here. The
        generator ends without yielding the terminal entry when `direct` wrote it.
        """
        key = self.store.keys.answer(question_id)
        last = after
        size = _PageSize()
        while True:
            # Catch up from the stream until its current end, a page of bounded size at a time.
            async for batch in self._history(question_id, last, size):
                last = batch[-1].entry_id
                yield batch
                if batch[-1].terminal:
                    return
            sub, cursor = self._subscribe(key, last)
            try:
                # Entries up to the shared read's cursor will not come live: read them here.
                async for batch in self._history(question_id, last, size, until=cursor):
                    last = batch[-1].entry_id
                    yield batch
                    if batch[-1].terminal:
                        return
                sub.last = last
                # Until the viewer overflows or `direct` wrote the terminal entry. Direct
                # writes only once the stream is read up to the shared read's cursor.
                while (live := await _next_live(sub, cursor, direct)) is not None:
                    for batch in await self._short_of(question_id, sub.last, cursor, size, live):
                        sub.last = batch[-1].entry_id
                        yield batch
                        if batch[-1].terminal:
                            return
                if sub.ended:
                    return
                last = sub.last
            finally:
                self._unsubscribe(sub)

    async def _short_of(
        self, question_id: str, last: str, cursor: str, size: _PageSize, live: list[Entry]
    ) -> list[list[Entry]]:
        """The batches to give for `live`: when the stream ended short of the shared read's
        `cursor` at the hand-over (a failover lost entries the shared read had seen, and
        their worker writes them again with their ids), the entries up to the cursor first:
        they are written again before anything after them."""
        if not entry_id_after(cursor, last):
            return [live]
        batches = [batch async for batch in self._history(question_id, last, size, until=cursor)]
        if batches:
            last = batches[-1][-1].entry_id
        rest = [e for e in live if entry_id_after(e.entry_id, last)]
        return [*batches, rest] if rest else batches

    async def _history(
        self, question_id: str, after: str, size: _PageSize, until: str | None = None
    ) -> AsyncIterator[list[Entry]]:
        """The stored entries after `after` (up to `until` when given), in bounded pages, each
        cut after a terminal entry."""
        last = after
        while until is None or entry_id_after(until, last):
            count = size.count
            page = await self.store.read(question_id, last, count)
            size.seen(page)
            beyond = until is not None and bool(page) and entry_id_after(page[-1].entry_id, until)
            if beyond:
                page = [e for e in page if not entry_id_after(e.entry_id, until or "")]
            batch = _counted(page)
            if batch:
                last = batch[-1].entry_id
                yield batch
                if batch[-1].terminal:
                    return
            if beyond or len(page) < count:
                return


async def _next_live(sub: Subscription, cursor: str, direct: Direct | None) -> list[Entry] | None:
    """The next live entries after `sub.last`, everything the shared read has handed over
    (never an empty list); None when the viewer's buffer overflowed (it catches up from
    Redis then) or `direct` wrote the terminal entry. While this waits with nothing
    buffered, and the viewer has read up to the shared read's `cursor`, `direct` is given
    the new entries instead."""
    while True:
        if direct is not None and not sub.buffer and not entry_id_after(cursor, sub.last):
            sub.direct = direct
        try:
            await sub.ready.wait()
        finally:
            sub.direct = None
        sub.ready.clear()
        if sub.overflowed or sub.ended:
            return None
        batch = _fresh(sub.take(), sub.last)
        if batch:
            _count(batch)
            return batch


# prometheus_client's labels() takes a lock and checks its arguments on every call: the
# counter of each entry type is looked up once.
_RELAYED = {kind: metrics.RELAYED.labels(kind.value) for kind in EntryType}


def _fresh(entries: list[Entry], last: str) -> list[Entry]:
    """The entries after `last` (what the viewer has), up to the first terminal one."""
    return _through_terminal([e for e in entries if entry_id_after(e.entry_id, last)])


def _through_terminal(entries: list[Entry]) -> list[Entry]:
    """`entries` up to the first terminal one."""
    for n, entry in enumerate(entries):
        if entry.terminal:
            return entries[: n + 1]
    return entries


def _count(entries: list[Entry]) -> None:
    """Each entry counted as relayed."""
    for entry in entries:
        _RELAYED[entry.type].inc()


def _counted(entries: list[Entry]) -> list[Entry]:
    """`entries` up to the first terminal one, each counted as relayed."""
    batch = _through_terminal(entries)
    _count(batch)
    return batch
