"""Redis clients: one bounded pool per process, plus dedicated connections for blocking reads.

Single node: a `Redis` over a `BlockingConnectionPool`. Cluster (`TOKENRELAY_REDIS_CLUSTER`):
redis-py's asyncio `RedisCluster` (MOVED/ASK, slot-table refresh and failover are its
job), made to fit what the store expects of a client:

- bounded: at most `size` commands in flight per process, so at most `size` connections
  per node (its own pools raise MaxConnectionsError instead of waiting);
- patient: it retries a command a few times at once when a node fails, which is over in
  milliseconds while a failover takes seconds; here a command is tried again with
  backoff for up to RETRY_WINDOW_S, a pipeline only for its commands that did not run;
- packed writes (single node): the worker's chunk writes are packed by hand and sent on a
  `Lane`, a connection of their own: no pool to take it from, no per-argument packing;
- scripts in pipelines (cluster): its pipelines have no script cache handling (an EVALSHA that
  meets a node without the script fails), so a script queued in a pipeline is sent as
  EVAL, which the server caches by digest.

The store is typed against `Redis`: `cluster_client` hands its client over as one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenrelay.pacing import Backoff

log = logging.getLogger(__name__)

BLOCK_MARGIN_S = 10.0
# A master's replica takes over after cluster-node-timeout plus an election: seconds.
RETRY_WINDOW_S = 20.0
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0

_RETRY_ERRORS: list[type[Exception]] = [RedisConnectionError, RedisTimeoutError]
_CLUSTER_RETRY = (RedisConnectionError, RedisTimeoutError, ClusterDownError, SlotNotCoveredError)


def _retry() -> Retry:
    # A Redis restart takes a few seconds: back off up to ~2 s between tries.
    return Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=8)


def _keepalive(url: str) -> dict[str, Any]:
    """TCP keepalive, for a TCP URL (a Unix socket, `unix://`, has none to set)."""
    return {} if url.startswith("unix:") else {"socket_keepalive": True}


def pooled_client(url: str, *, size: int, name: str) -> Redis:
    """A client whose pool never holds more than `size` connections; callers queue for one."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=size,
        timeout=None,
        decode_responses=True,
        client_name=name,
        health_check_interval=30,
        **_keepalive(url),
    )
    return Redis(connection_pool=pool, retry=_retry(), retry_on_error=_RETRY_ERRORS)


def bulk(value: str) -> bytes:
    """`value` as a RESP bulk string, for commands packed by hand."""
    data = value.encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


def pack(args: Sequence[str | int]) -> bytes:
    """One command as RESP, packed by hand."""
    return b"*%d\r\n%b" % (
        len(args),
        b"".join(bulk(a if isinstance(a, str) else str(a)) for a in args),
    )


async def send_packed(conn: AbstractConnection, payload: bytes) -> None:
    """`conn.send_packed_command(payload)` without its per-send task: with a socket timeout
    set, redis-py wraps each send in `asyncio.wait_for` (a task of its own, ~15 us). Writing
    to the socket's buffer does not wait unless the buffer is full; the reply's read keeps
    the timeout."""
    if not conn.is_connected:
        await conn.connect()  # type: ignore[no-untyped-call]
    try:
        await conn._send_packed_command([payload])
    except OSError as e:
        await conn.disconnect(nowait=True)
        raise RedisConnectionError(f"Error writing to Redis: {e}") from e


async def exchange(conn: AbstractConnection, payload: bytes, replies: int) -> list[Any]:
    """Send `payload` (commands packed by hand) on `conn` and read its `replies`, in order;
    an error reply comes back as its exception, in its place. A connection that fails part
    way is closed: a half-read reply must not be taken for the next command's."""
    try:
        await send_packed(conn, payload)
        out: list[Any] = []
        for _ in range(replies):
            try:
                out.append(await conn.read_response())
            except ResponseError as e:  # the reply was read whole: the connection is in step
                out.append(e)
        return out
    except BaseException:
        await conn.disconnect()
        raise


async def call_packed(
    client: Redis, payload: bytes, replies: int, lane: Lane | None = None
) -> list[Any]:
    """`exchange` on `lane`, else on a connection of `client`'s pool; sent again as
    `client`'s own commands are (its Retry) when the connection fails, so what is sent this
    way must be safe to run twice (the store's numbered writes are)."""

    async def send() -> list[Any]:
        if lane is not None:
            return await lane.exchange(payload, replies)
        pool = client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            return await exchange(conn, payload, replies)
        finally:
            await pool.release(conn)

    retry = client.get_retry()
    if retry is None:
        return await send()
    return await retry.call_with_retry(send, _closed_already)


async def _closed_already(error: Exception) -> None:
    """`exchange` closed the failed connection: the next try opens a new one."""


LANE_TIMEOUT_S = 5.0  # as redis-py's default socket timeout


class TakenOver(asyncio.Protocol):
    """A connection redis-py opened (address, TLS, AUTH, HELLO, name), its transport then
    read by a protocol of tokenrelay's instead of redis-py's StreamReader: a subclass
    parses what `data_received` brings, in the I/O callback, and `_end` is told why the
    connection ended. Its close is passed on to redis-py's own protocol, so that closing
    the connection through redis-py still completes (`wait_closed`). Relies on
    `conn._writer` (private: pyproject.toml's note on redis)."""

    CLOSED = "Redis closed the connection"  # the start of what `_end` is told on a close

    def __init__(self, conn: AbstractConnection) -> None:
        writer = _writer_of(conn)
        assert writer is not None  # connected
        self._transport = cast(asyncio.Transport, writer.transport)
        self._before: asyncio.BaseProtocol = self._transport.get_protocol()
        self._transport.set_protocol(self)

    def eof_received(self) -> bool:
        return False  # the transport closes: connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(RedisConnectionError(f"{self.CLOSED} ({exc or 'EOF'})"))
        self._before.connection_lost(exc)  # redis-py's close (wait_closed) completes

    def _end(self, error: Exception) -> None:
        """The connection ended with `error` (closed, or it brought what cannot be read)."""
        self._transport.abort()


class _Replies(TakenOver):
    """A lane's connection once redis-py has opened it: the replies are parsed by hiredis
    as their bytes arrive, and an exchange's are handed over together when its last one is
    in. redis-py's `read_response` per reply cost a timeout context, the StreamReader's
    wake-up and the parser's coroutines."""

    def __init__(self, conn: AbstractConnection) -> None:
        encoder = conn.encoder
        options: dict[str, Any] = {
            "replyError": BaseParser.parse_error,  # error replies as redis-py's exceptions
            "notEnoughData": _NOT_YET,  # not False: a RESP3 reply may be False
            "errors": encoder.encoding_errors,
        }
        if encoder.decode_responses:
            options["encoding"] = encoder.encoding
        self._parse = hiredis.Reader(**options)
        # Kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11.
        self._loop = asyncio.get_running_loop()
        self._replies: list[Any] = []
        self._want = 0
        self._done: asyncio.Future[list[Any]] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.closed: Exception | None = None  # why the connection ended, once it has
        super().__init__(conn)

    def of(self, conn: AbstractConnection) -> bool:
        """Whether this reads `conn`'s current transport (a reconnect makes a new one)."""
        writer = _writer_of(conn)
        return writer is not None and writer.transport is self._transport

    @property
    def busy(self) -> bool:
        return self._done is not None

    def send(
        self, payload: bytes, replies: int, within_s: float | None = None
    ) -> asyncio.Future[list[Any]]:
        """Send `payload`; the future gets its `replies` replies, in order (a command's error
        reply in its place), or what ended the connection: a reply out of step, an error
        reply that is the connection's rather than a command's (LOADING, auth), or, with
        `within_s`, no whole reply by then (RedisTimeoutError)."""
        if self.closed is not None:
            raise self.closed
        if self._done is not None:
            raise RuntimeError("a lane sends one exchange at a time")
        loop = self._loop
        done = loop.create_future()
        self._done, self._want, self._replies = done, replies, []
        if within_s is not None:
            self._deadline = loop.call_later(within_s, self._late, within_s)
        self._transport.write(payload)
        return done

    def _late(self, within_s: float) -> None:
        self._end(RedisTimeoutError(f"Redis did not answer a write within {within_s:.0f} s"))

    def data_received(self, data: bytes) -> None:
        parse, replies = self._parse, self._replies
        try:
            parse.feed(data)
            while (reply := parse.gets()) is not _NOT_YET:
                replies.append(reply)
        except hiredis.ProtocolError as e:
            self._end(RedisConnectionError(f"Redis sent what cannot be read: {e}"))
            return
        if len(replies) < self._want:
            return
        if self._done is None or len(replies) > self._want:  # a reply nobody asked for
            self._end(RedisConnectionError("Redis sent a reply out of step"))
            return
        for reply in replies:  # not a command's error: the connection's (LOADING, auth)
            if isinstance(reply, Exception) and not isinstance(reply, ResponseError):
                self._end(reply)
                return
        done = self._settled()
        if done is not None and not done.done():  # (its caller gave up: cancelled, timed out)
            done.set_result(replies)

    def _settled(self) -> asyncio.Future[list[Any]] | None:
        """The exchange's future, no longer on its way; its deadline disarmed."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        done, self._done = self._done, None
        return done

    def _end(self, error: Exception) -> None:
        self.closed = self.closed or error
        done = self._settled()
        if done is not None and not done.done():
            done.set_exception(error)
        super()._end(error)


def _writer_of(conn: AbstractConnection) -> asyncio.StreamWriter | None:
    """redis-py's stream writer of `conn` (private: pyproject.toml's note on redis)."""
    return cast(Any, conn)._writer  # type: ignore[no-any-return]


class _NotYet:
    """hiredis's answer when a reply is not whole yet."""


_NOT_YET = _NotYet()


class Lane:
    """A connection of its own for one sender of packed commands (a worker's chunk writer,
    a process's batcher), with its client's settings: taking a pool connection and giving
    it back cost the writer more than packing its batch (redis-py's pool records and
    dispatches events on both), and a pool connection's socket timeout wraps every send in
    a task of its own. Here one deadline covers a whole exchange, and the replies are read
    in the I/O callback (`_Replies`). Opened on first use and again after a failure; one
    exchange at a time. Named as its client, with `suffix`."""

    def __init__(self, client: Redis, suffix: str) -> None:
        pool = client.connection_pool
        name = f"{pool.connection_kwargs.get('client_name') or 'tokenrelay'}{suffix}"
        kwargs = {**pool.connection_kwargs, "client_name": name, "socket_timeout": None}
        self._conn: AbstractConnection = pool.connection_class(**kwargs)
        self._replies: _Replies | None = None
        self._lock = asyncio.Lock()

    async def exchange(self, payload: bytes, replies: int) -> list[Any]:
        """Send `payload` (commands packed by hand) and read its `replies`, in order; an
        error reply comes back as its exception, in its place. One that Redis closed while
        it was idle (a restart; a pool finds those when it hands a connection out) fails at
        once: the payload goes once more, on a new connection. What is sent on a lane must
        be safe to run twice (the store's numbered writes are)."""
        async with self._lock:
            try:
                async with asyncio.timeout(LANE_TIMEOUT_S):
                    was_open = self._replies is not None and self._replies.closed is None
                    try:
                        return await self._exchange(payload, replies)
                    except RedisConnectionError:
                        if not was_open:
                            raise
                        log.info("Redis closed the writing connection; writing on a new one")
                        return await self._exchange(payload, replies)
            except TimeoutError:
                raise RedisTimeoutError(
                    f"Redis did not answer a write within {LANE_TIMEOUT_S:.0f} s"
                ) from None

    def start(self, payload: bytes, replies: int) -> asyncio.Future[list[Any]] | None:
        """An exchange begun now, in the caller's turn (no task, no await): `payload` is
        written at once, and the future gets its replies, in order, or the error the
        connection ended with (then closed, and opened again by the next exchange). Tried
        once: what fails is the caller's to send again, with `exchange`. None when the lane
        cannot send at once (not open yet, closed, an exchange on its way)."""
        if not self.ready:
            return None
        assert self._replies is not None
        return self._replies.send(payload, replies, LANE_TIMEOUT_S)

    @property
    def ready(self) -> bool:
        """Whether `start` can send now: open, and no exchange on its way."""
        taken = self._replies
        return not (
            taken is None
            or taken.closed is not None
            or taken.busy
            or self._lock.locked()
            or not taken.of(self._conn)
        )

    async def _exchange(self, payload: bytes, replies: int) -> list[Any]:
        """One try. A connection that fails part way is closed: a reply read later must not
        be taken for the next exchange's."""
        try:
            return await (await self._open()).send(payload, replies)
        except BaseException:
            await self._close()
            raise

    async def _open(self) -> _Replies:
        conn = self._conn
        taken = self._replies
        if taken is not None and taken.closed is None and taken.of(conn):
            return taken
        if taken is not None:  # closed by Redis while idle, or failed
            await self._close()
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
        except OSError as e:
            raise RedisConnectionError(f"Error connecting to Redis: {e}") from e
        self._replies = _Replies(conn)
        return self._replies

    async def _close(self) -> None:
        self._replies = None
        await self._conn.disconnect()

    async def open(self) -> None:
        """Connect now (else on first use), so a process's connections do not change later."""
        async with self._lock:
            await self._open()

    async def aclose(self) -> None:
        await self._close()


def own_lane(client: Redis, suffix: str) -> Lane | None:
    """A `Lane` of `client`'s for one sender, named with `suffix`; None in a cluster, where
    what would go on it goes through the client (its commands find their node)."""
    return None if is_cluster(client) else Lane(client, suffix)


def dedicated_client(url: str, *, name: str, block_ms: int) -> Redis:
    """One connection of its own, for a blocking XREAD/XREADGROUP loop.

    redis-py's default 5 s socket timeout would cut every longer block short; the read
    timeout here outlasts the block by a margin, so only a dead server trips it.
    """
    return Redis.from_url(
        url,
        decode_responses=True,
        client_name=name,
        single_connection_client=True,
        socket_timeout=block_ms / 1000 + BLOCK_MARGIN_S,
        **_keepalive(url),
    )


def node_client(node: ClusterNode, *, name: str, block_ms: int) -> Redis:
    """A dedicated connection to one cluster node (a blocking read over one slot's keys)."""
    kwargs = node.connection_kwargs
    return Redis(
        host=node.host,
        port=int(node.port),
        username=kwargs.get("username"),
        password=kwargs.get("password"),
        decode_responses=True,
        client_name=name,
        single_connection_client=True,
        socket_keepalive=True,
        socket_timeout=block_ms / 1000 + BLOCK_MARGIN_S,
    )


def cluster_client(url: str, *, size: int, name: str, socket_timeout_s: float = 5.0) -> Redis:
    """A cluster client (see the module's docstring), typed as the `Redis` the store expects.

    `RedisCluster` offers every command the store uses with the same signature, but is not
    a `Redis` subclass; `is_cluster` tells them apart where it matters (the relay, the
    consumer group's reads)."""
    client: ClusterClient = ClusterClient.from_url(  # type: ignore[assignment]
        url,
        decode_responses=True,
        client_name=name,
        max_connections=size + 2,  # a command retried after MOVED may take a second one
        socket_keepalive=True,
        socket_timeout=socket_timeout_s,
        health_check_interval=30,
        # Its own retries are immediate, and a failed pipeline closes every connection of
        # the client (blocked reads included); ours wait, and close nothing.
        retry=Retry(NoBackoff(), retries=0),
    )
    client.bound(size)
    return cast(Redis, client)


class NodeReaders:
    """Dedicated connections for blocking reads over a cluster, one per slot read: each to
    the node serving its slot, opened on first use, reopened after MOVED or a failover
    (`relocate`). redis-py's cluster client is not used for these: a read may block for
    seconds, and its refreshes recycle connections that are in use."""

    def __init__(self, cluster: Redis, *, name: str, block_ms: int) -> None:
        self._cluster = as_cluster(cluster)
        self._name = name
        self._block_ms = block_ms
        self._clients: dict[int, Redis] = {}

    async def client_for(self, key: str) -> Redis:
        slot = self._cluster.keyslot(key)
        client = self._clients.get(slot)
        if client is None:
            node = self._cluster.get_node_from_key(key)
            if node is None:
                raise SlotNotCoveredError(f"no node serves {key}'s slot yet")
            client = node_client(node, name=self._name, block_ms=self._block_ms)
            self._clients[slot] = client
        return client

    async def relocate(self, key: str) -> None:
        """Forget the connection for `key`'s slot and learn the cluster's layout anew."""
        client = self._clients.pop(self._cluster.keyslot(key), None)
        if client is not None:
            await client.aclose()
        try:
            await self._cluster.nodes_manager.initialize()
        except RedisError as e:
            log.warning("redis cluster: cannot refresh the layout (%s)", e)

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def as_cluster(client: Redis) -> ClusterClient:
    assert isinstance(client, ClusterClient)
    return client


async def warm(client: Redis, count: int) -> None:
    """Open `count` pool connections now, so the number a process holds never depends on load.
    A cluster client learns the cluster's layout instead (its connections open on use)."""
    if is_cluster(client):
        await as_cluster(client).initialize()
        return
    pool = client.connection_pool
    conns = [await pool.get_connection() for _ in range(count)]  # type: ignore[no-untyped-call]
    for conn in conns:
        await pool.release(conn)


class _Backoff:
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + RETRY_WINDOW_S
        self._delay = Backoff(RETRY_FIRST_S, RETRY_MAX_S)

    async def wait(self, error: Exception, what: object) -> None:
        """Sleep before the next try of `what`; raise `error` once the window is over."""
        loop = asyncio.get_running_loop()
        delay_s = self._delay.delay_s
        if loop.time() + delay_s > self._deadline:
            raise error
        log.warning("redis cluster: %s: %s; trying again in %.2fs", what, error, delay_s)
        await self._delay.sleep()


class ClusterClient(RedisCluster):
    """RedisCluster, bounded and patient, whose scripts also work in its pipelines."""

    _in_flight: asyncio.Semaphore

    def bound(self, size: int) -> None:
        self._in_flight = asyncio.Semaphore(size)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        backoff: _Backoff | None = None
        while True:
            try:
                async with self._in_flight:
                    return await super().execute_command(*args, **kwargs)
            except _CLUSTER_RETRY as e:
                if "target_nodes" in kwargs:  # aimed at one node: its caller decides
                    raise
                backoff = backoff or _Backoff()
                await backoff.wait(e, args[0])
                self._initialize = True  # learn the new layout before the next try

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        if transaction or shard_hint:
            return super().pipeline(transaction, shard_hint)
        return _Pipeline(self)  # type: ignore[abstract]  # as RedisCluster.pipeline does

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """As Redis.aclose is called (the pool is always closed: it is the client's own)."""
        await super().aclose()

    def register_script(self, script: str | bytes) -> AsyncScript:  # type: ignore[override]
        return _Script(self, script)

    async def run_bounded(self, pipe: ClusterPipeline, raise_on_error: bool) -> list[Any]:
        async with self._in_flight:
            return await ClusterPipeline.execute(pipe, raise_on_error=raise_on_error)


class _Pipeline(ClusterPipeline):
    """Retries, with backoff, the commands that did not run or whose reply was lost (a node
    failing over); those answered are never sent twice. One whose reply was lost with its
    node may have run: docs/scaling.md says what that means for an answer."""

    cluster_client: ClusterClient

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        queue: list[Any] = list(self._execution_strategy._command_queue)  # type: ignore[attr-defined]
        client = self.cluster_client
        backoff: _Backoff | None = None
        pipe: ClusterPipeline = self
        todo = sent = queue  # the original commands still to run; what `pipe` holds for them
        while True:
            error: Exception | None = None
            try:
                await client.run_bounded(pipe, raise_on_error=False)
            except _CLUSTER_RETRY as e:  # a node could not be reached: its commands never ran
                error = e
            finally:
                await pipe.reset()  # type: ignore[no-untyped-call]
            for new, old in zip(sent, todo, strict=True):
                old.result = new.result
            failed = [c for c in todo if c.result is None or isinstance(c.result, _CLUSTER_RETRY)]
            if not failed:
                break
            if error is None:
                error = next(c.result for c in failed if isinstance(c.result, Exception))
            backoff = backoff or _Backoff()
            await backoff.wait(error, f"pipeline ({len(failed)} commands)")
            client._initialize = True  # learn the new layout first
            pipe = ClusterPipeline(client)  # type: ignore[abstract]
            for cmd in failed:
                cmd.result = None
                pipe.execute_command(*cmd.args, **cmd.kwargs)
            sent = list(pipe._execution_strategy._command_queue)  # type: ignore[attr-defined]
            todo = failed
        if raise_on_error:
            for cmd in queue:
                if isinstance(cmd.result, Exception):
                    raise cmd.result
        return [cmd.result for cmd in queue]


class _Script(AsyncScript):
    """EVALSHA as usual; EVAL in a cluster pipeline (no script cache handling there); EVAL
    once more when a node lacks the script (a promoted replica, a restarted node)."""

    async def __call__(
        self,
        keys: Sequence[Any] | None = None,
        args: Iterable[Any] | None = None,
        client: Any = None,
    ) -> Any:
        keys = list(keys or [])
        argv = tuple(keys) + tuple(args or ())
        target = client if client is not None else self.registered_client
        if isinstance(target, ClusterPipeline):
            return target.execute_command("EVAL", self.script, len(keys), *argv)
        try:
            return await target.evalsha(self.sha, len(keys), *argv)
        except NoScriptError:
            return await target.eval(str(self.script), len(keys), *argv)
