"""Contracts with library internals that tokenrelay relies on, checked against the real thing.

Two couplings reach below the libraries' public APIs for speed, and pyproject.toml bounds
those libraries from above because of them; a new version may raise the bound once this
file passes on it:

- redis-py (relay.py): the shared XREAD is packed by hand (`_ReadSet.command`) and sent
  on the reader's own connection (`Redis.connection`, `initialize()`,
  `send_packed_command`, `read_response`, `disconnect`), woken by CLIENT UNBLOCK of the
  id `client_id()` reports for that connection (cluster); on a single node that
  connection, once redis-py opened it, is taken over (`connection.TakenOver`:
  `conn._writer.transport`, its protocol replaced, redis-py's told of the close),
  subscribed to the doorbell by a hand-packed SUBSCRIBE, and read with hiredis; so is
  each `Lane`'s connection (connection.py), its error replies made into redis-py's
  exceptions by `BaseParser.parse_error`.
- python-engineio / python-socketio (gateway/sockets.py): an emit is a Socket.IO EVENT
  packet built by hand and handed to `sio.eio.send`; backpressure reads
  `sio.eio.sockets[eio_sid].queue.qsize()` after `sio.manager.eio_sid_from_sid(sid, "/")`;
  gateway/packets.py subclasses `socketio.packet.Packet` (the `serializer=` argument);
  gateway/engine.py subclasses `engineio.async_socket.AsyncSocket` to replace `poll()`
  (the queue of packets its websocket writer sends) and swaps the class of each socket
  the gateway accepts.
- sse-starlette (gateway/sse.py): the gateway's own SSE response ends its streams when the
  server stops through sse-starlette's shutdown watcher,
  `EventSourceResponse._listen_for_exit_signal()` (`AppStatus.should_exit`, which its patch
  of uvicorn's `Server.handle_exit` sets on SIGTERM).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import engineio
import httpx
import orjson
import pytest
import socketio
import uvicorn
from engineio import packet as eio_packet
from engineio.async_socket import AsyncSocket
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, NodesManager
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from socketio import packet as sio_packet
from sse_starlette.sse import AppStatus
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from tests.support.net import free_port
from tests.support.sockets import connected, wait_for
from tests.support.valkey_cluster import ValkeyCluster
from tokenrelay.connection import (
    BLOCK_MARGIN_S,
    ClusterClient,
    Lane,
    as_cluster,
    cluster_client,
    dedicated_client,
    exchange,
    node_client,
    pack,
)
from tokenrelay.gateway.access import Access
from tokenrelay.gateway.engine import LeanServer, LeanSocket
from tokenrelay.gateway.packets import UNREADABLE, TolerantPacket
from tokenrelay.gateway.sockets import SOCKET_QUEUE_MAX, SocketGateway
from tokenrelay.gateway.sse import server_stopping
from tokenrelay.keys import Keys
from tokenrelay.relay import _PING, _Doorbell, _Reader, _ReadSet
from tokenrelay.services import Services
from tokenrelay.settings import Settings
from tokenrelay.store import Limits, Put, Store
from tokenrelay.store.answers import _APPEND_MANY_SHA, WRITES_PER_CALL
from tokenrelay.wire import Entry, EntryType, dumps

# -- redis-py: the relay's hand-packed XREAD ---------------------------------------------


def _parsers() -> list[Any]:
    from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser, _AsyncRESP3Parser

    return [
        pytest.param(None, id="default-parser"),
        pytest.param(_AsyncHiredisParser, id="hiredis"),
        pytest.param(_AsyncRESP2Parser, id="python-resp2"),
        pytest.param(_AsyncRESP3Parser, id="python-resp3"),
    ]


@pytest.fixture
def keys(make_settings: Callable[..., Settings]) -> Keys:
    return Keys(make_settings().key_prefix)


@asynccontextmanager
async def single(redis_url: str, **options: Any) -> AsyncIterator[Redis]:
    """A single-connection client, as `dedicated_client` makes (options may override)."""
    values: dict[str, Any] = {
        "decode_responses": True,
        "single_connection_client": True,
        "client_name": f"contract-{secrets.token_hex(3)}",
    }
    values.update(options)
    parser = values.pop("parser_class", None)
    if parser is not None:
        values["parser_class"] = parser
    client = Redis.from_url(redis_url, **values)
    try:
        yield client
    finally:
        await client.aclose()


async def _connection(client: Redis) -> AbstractConnection:
    if client.connection is None:
        await client.initialize()
    conn = client.connection
    assert isinstance(conn, AbstractConnection)
    return conn


def _pairs(reply: Any) -> list[tuple[str, Any]]:
    """(key, entries) of an XREAD reply, RESP2 (a list) or RESP3 (a map), as relay.py reads it."""
    return [(k, v) for k, v in (reply.items() if isinstance(reply, dict) else reply)]


def _packed(*keys_and_cursors: tuple[str, str], count: int = 10, block_ms: int = 100) -> bytes:
    read = _ReadSet()
    for key, cursor in keys_and_cursors:
        read.set(key, cursor)
    return read.command(count, block_ms)


async def test_a_single_connection_client_holds_one_connection_it_exposes(
    redis_url: str,
) -> None:
    """relay.py reads `reader.connection`, initialising the client when it is None."""
    reader = dedicated_client(redis_url, name="contract-reader", block_ms=3000)
    try:
        assert reader.single_connection_client is True
        assert reader.connection is None, "no connection before initialize()"
        await reader.initialize()
        conn = reader.connection
        assert isinstance(conn, AbstractConnection)
        await reader.initialize()
        assert reader.connection is conn, "initialize() twice keeps the one connection"
        # The client's own commands go over that same connection.
        await reader.ping()
        assert reader.connection is conn
        # The read timeout outlasts the block, so only a dead server trips it.
        assert conn.socket_timeout == pytest.approx(3.0 + BLOCK_MARGIN_S)
        for name in (
            "send_packed_command",
            "_send_packed_command",  # connection.send_packed: the send without its task
            "read_response",
            "disconnect",
            "pack_command",
        ):
            assert callable(getattr(conn, name)), name
    finally:
        await reader.aclose()


@pytest.mark.parametrize("key", ["plain", "ünïcode-é", "with space", "{q:tag}:answer"])
async def test_the_hand_packed_xread_is_what_redis_py_would_send(redis_url: str, key: str) -> None:
    async with single(redis_url) as client:
        conn = await _connection(client)
        read = _ReadSet()
        read.set(key, "0-0")
        read.set("other", "5-1")
        read.set(key, "1700000000000-12")  # a cursor moves; the key keeps its place
        expected = conn.pack_command(
            "XREAD", "COUNT", 512, "BLOCK", 2000, "STREAMS", key, "other", "1700000000000-12", "5-1"
        )
        assert read.command(512, 2000) == b"".join(expected)
        read.remove("other")
        expected = conn.pack_command(
            "XREAD", "COUNT", 1, "BLOCK", 0, "STREAMS", key, "1700000000000-12"
        )
        assert read.command(1, 0) == b"".join(expected)


async def test_the_hand_packed_writes_are_what_redis_py_would_send(redis_url: str) -> None:
    """store.write_batch's EVALSHAs (answers.py `_packed`): a chunk's fields joined ahead of
    time, other entries' fields one by one; cut every WRITES_PER_CALL writes."""
    keys = Keys("contract:")
    store = Store(Redis(), keys, Limits(60, 10, 1000, 10, 10))
    entries = [
        Entry(EntryType.CHUNK, "ünï "),
        Entry(EntryType.START, meta={"topic": "t", "question": "q"}),
        Entry(EntryType.CHUNK, ""),
    ]
    puts = [
        Put(f"q{n}", entry, n, f"{n}-0", "" if n == 0 else f"{n - 1}-0")
        for n, entry in enumerate(entries * 40)
    ]
    async with single(redis_url) as client:
        conn = await _connection(client)
        expected: list[bytes] = []
        for at in range(0, len(puts), WRITES_PER_CALL):
            part = puts[at : at + WRITES_PER_CALL]
            names: list[str] = []
            args: list[str | int] = [keys.written, 1000]
            for put in part:
                names += [keys.answer(put.question_id), keys.question(put.question_id)]
                fields = put.entry.fields()
                args += [put.epoch, put.entry_id, put.after, 2 * len(fields)]
                args += [x for pair in fields.items() for x in pair]
            expected += conn.pack_command("EVALSHA", _APPEND_MANY_SHA, len(names), *names, *args)
        payload, calls = store.packed_writes(puts)
    assert calls == 2 == -(-len(puts) // WRITES_PER_CALL)
    assert payload == b"".join(expected)


@pytest.mark.parametrize("key", ["plain", "ünïcode-é", "{q:tag}:answer"])
async def test_the_hand_packed_due_and_doorbell_reads_are_what_redis_py_would_send(
    redis_url: str, key: str
) -> None:
    async with single(redis_url) as client:
        conn = await _connection(client)
        read = _ReadSet()
        for k, cursor in ((key, "3-4"), ("idle", "0-0"), ("other", "5-1")):
            read.set(k, cursor)
        expected = conn.pack_command("XREAD", "COUNT", 512, "STREAMS", "other", key, "5-1", "3-4")
        assert read.command_for(["other", key], 512) == b"".join(expected)
        packed = conn.pack_command(
            "XREAD",
            "COUNT",
            8,
            "BLOCK",
            100,
            "STREAMS",
            "bell",
            key,
            "idle",
            "other",
            "9-9",
            "3-4",
            "0-0",
            "5-1",
        )
        assert read.command(8, 100, ("bell", "9-9")) == b"".join(packed)


@pytest.mark.parametrize("parser", _parsers())
@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_packed_xread_reply_has_the_shape_the_relay_parses(
    redis_url: str, keys: Keys, parser: Any, protocol: int
) -> None:
    """RESP2: [[key, [[id, [field, value, ...]], ...]], ...]; RESP3: the same as a map. Keys,
    ids, fields decoded to str; nil (None) when the block times out."""
    if protocol == 3 and parser is not None and parser.__name__ == "_AsyncRESP2Parser":
        pytest.skip("the RESP2 parser does not speak RESP3")
    a, b = keys.answer("contract-a"), keys.answer("contract-b")
    entries = [Entry(EntryType.START, meta={"m": 1}), Entry(EntryType.CHUNK, "ü <b>")]
    async with single(redis_url, protocol=protocol, parser_class=parser) as client:
        ids = [str(await client.xadd(a, e.fields())) for e in entries]  # type: ignore[arg-type]
        conn = await _connection(client)
        await conn.send_packed_command(_packed((a, "0-0"), (b, "0-0")), check_health=False)
        reply = await conn.read_response()
        pairs = _pairs(reply)
        assert [key for key, _ in pairs] == [a], "only keys with entries are in the reply"
        ((_, raw),) = pairs
        got = [Entry.from_flat(entry_id, flat) for entry_id, flat in raw]
        assert got == [Entry(e.type, e.text, e.meta, i) for e, i in zip(entries, ids, strict=True)]
        assert all(isinstance(entry_id, str) for entry_id, _ in raw)

        await conn.send_packed_command(_packed((a, ids[-1]), block_ms=50), check_health=False)
        assert await conn.read_response() is None
        # The connection is in step: the next command gets its own reply.
        assert await client.ping() is True
        await client.delete(a)


class _Heard:
    """What `_Doorbell` hands to its reader (relay.py's `_Reader._heard`), kept in order."""

    def __init__(self) -> None:
        self.replies: list[Any] = []
        self.came = asyncio.Event()

    def _heard(self, reply: Any) -> None:
        self.replies.append(reply)
        self.came.set()

    async def next(self) -> Any:
        async with asyncio.timeout(5):
            while not self.replies:
                self.came.clear()
                await self.came.wait()
        return self.replies.pop(0)


@pytest.mark.parametrize("parser", _parsers())
@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_doorbell_message_reads_as_the_listener_parses_it(
    redis_url: str, redis: Redis, keys: Keys, parser: Any, protocol: int
) -> None:
    """The doorbell's connection as the listener takes it over (`_Doorbell`): opened by
    redis-py (`initialize()`, whatever its parser), its transport (the connection's
    `_writer.transport`) then read by hiredis in the I/O callback. SUBSCRIBE (packed by
    hand) is confirmed [b"subscribe", channel, 1], each PUBLISH comes as [b"message",
    channel, payload] with the payload's bytes as sent (RESP3: a push), a PING's reply is no
    list of three (RESP2 [b"pong", b""], RESP3 PONG); closing the client through redis-py
    still completes (the close is passed on to its protocol) and ends `lost`."""
    if protocol == 3 and parser is not None and parser.__name__ == "_AsyncRESP2Parser":
        pytest.skip("the RESP2 parser does not speak RESP3")
    channel = keys.written
    payload = '[["ab\u00fcc"]]'.encode()
    heard = _Heard()
    async with single(redis_url, protocol=protocol, parser_class=parser) as client:
        conn = await _connection(client)
        bell = _Doorbell(heard, conn)  # type: ignore[arg-type]
        bell.send(pack(["SUBSCRIBE", channel]))
        assert await heard.next() == [b"subscribe", channel.encode(), 1]
        assert await redis.publish(channel, payload) == 1
        message = await heard.next()
        assert message == [b"message", channel.encode(), payload]
        assert orjson.loads(message[2]) == [["abüc"]]
        bell.send(_PING)
        pong = await heard.next()
        assert not (isinstance(pong, list) and len(pong) >= 3), pong
        async with asyncio.timeout(5):
            await conn.disconnect()
            error = await bell.lost
    assert "closed" in str(error), error


def _as_compared(reply: Any) -> Any:
    """A reply with its errors as (class, message): exceptions do not compare equal."""
    if isinstance(reply, Exception):
        return (type(reply), str(reply))
    if isinstance(reply, list):
        return [_as_compared(r) for r in reply]
    return reply


@pytest.mark.parametrize("parser", _parsers())
@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("decode", [True, False], ids=["str", "bytes"])
async def test_a_lane_reads_replies_as_redis_py_does(
    redis_url: str, keys: Keys, parser: Any, protocol: int, decode: bool
) -> None:
    """A `Lane` (connection.py) lets redis-py open its connection (whatever its parser,
    HELLO 2 or 3) and then reads the replies itself, with hiredis in the I/O callback
    (`_Replies`): each reply must be what redis-py's `read_response` gives on the same
    kind of connection: strings decoded or not as the client asks, RESP3 maps and
    booleans (a false one is a reply, not "nothing yet"), error replies as redis-py's
    exception classes in their place (NOSCRIPT as NoScriptError, which the store's writes
    and asks look for), and nothing out of step after an error."""
    if protocol == 3 and parser is not None and parser.__name__ == "_AsyncRESP2Parser":
        pytest.skip("the RESP2 parser does not speak RESP3")
    text, record, stream = (keys.answer(f"contract-lane-{n}") for n in range(3))
    commands: list[list[str | int]] = [
        ["SET", text, "ab\u00fcc"],
        ["GET", text],
        ["HSET", record, "a", "1", "b", "\u00e9"],
        ["HGETALL", record],
        ["XADD", stream, "1-1", "type", "chunk", "data", "x"],
        ["XRANGE", stream, "-", "+"],
        ["HGETALL", text],  # WRONGTYPE
        ["EVALSHA", "0" * 40, 0],  # NOSCRIPT
        ["EVAL", "return {1, 'two', false, {3, 'four'}}", 0],
        ["EVAL", "return false", 0],
        ["EXISTS", text, record, "no such key"],
        ["GET", "no such key"],
    ]
    payload = b"".join(pack(command) for command in commands)
    async with single(
        redis_url, protocol=protocol, parser_class=parser, decode_responses=decode
    ) as client:
        await client.delete(text, record, stream)
        lane = Lane(client, "-lane")
        try:
            got = await lane.exchange(payload, 12)
            await client.delete(text, record, stream)
            expected = await exchange(await _connection(client), payload, 12)
            assert _as_compared(got) == _as_compared(expected)
            assert isinstance(got[7], NoScriptError)
            assert isinstance(got[6], ResponseError) and "WRONGTYPE" in str(got[6])
            assert await lane.exchange(pack(["ECHO", "in step"]), 1) == [
                "in step" if decode else b"in step"
            ]
        finally:
            await lane.aclose()
            await client.delete(text, record, stream)


@pytest.mark.parametrize("parser", _parsers())
async def test_an_error_reply_surfaces_as_a_response_error(
    redis_url: str, keys: Keys, parser: Any
) -> None:
    """relay.py takes a ResponseError raised by read_response, or handed back by it."""
    key = keys.answer("contract-wrongtype")
    async with single(redis_url, parser_class=parser) as client:
        await client.set(key, "not a stream")
        conn = await _connection(client)
        await conn.send_packed_command(_packed((key, "0-0")), check_health=False)
        try:
            reply = await conn.read_response()
        except ResponseError as e:
            reply = e
        assert isinstance(reply, ResponseError) and "WRONGTYPE" in str(reply)
        assert await client.ping() is True
        await client.delete(key)


async def test_client_unblock_of_the_reported_id_ends_the_packed_read(
    redis_url: str, redis: Redis, keys: Keys
) -> None:
    """The relay re-arms by CLIENT UNBLOCK of `reader.client_id()`: that id must be the
    connection the hand-packed XREAD blocks on, and the unblocked read answers nil."""
    async with single(redis_url) as reader:
        reader_id = int(await reader.client_id())
        conn = await _connection(reader)
        await conn.send_packed_command(
            _packed((keys.answer("contract-idle"), "0-0"), block_ms=30_000), check_health=False
        )
        reading = asyncio.create_task(conn.read_response())
        try:
            async with asyncio.timeout(5):
                while not await redis.client_unblock(reader_id):
                    await asyncio.sleep(0.01)  # not blocked yet
                assert await reading is None
        finally:
            reading.cancel()
        assert int(await reader.client_id()) == reader_id, "still the same connection"


async def test_read_response_gives_up_at_the_socket_timeout(redis_url: str, keys: Keys) -> None:
    """dedicated_client's socket_timeout bounds a read on a server that stopped answering:
    read_response raises a RedisError (caught by the relay's loop), it does not hang."""
    async with single(redis_url, socket_timeout=0.3) as reader:
        conn = await _connection(reader)
        await conn.send_packed_command(
            _packed((keys.answer("contract-slow"), "0-0"), block_ms=10_000), check_health=False
        )
        async with asyncio.timeout(5):
            with pytest.raises(RedisTimeoutError):
                await conn.read_response()


async def test_after_disconnect_the_next_send_reconnects_with_the_client_name(
    redis_url: str, keys: Keys
) -> None:
    """After an error the relay disconnects the connection and sends on it again without
    initialize(): send_packed_command must reconnect (and say the client's name again)."""
    key = keys.answer("contract-reconnect")
    async with single(redis_url, client_name="contract-reconnects") as reader:
        await reader.xadd(key, {"type": "chunk", "data": "x"})
        first_id = int(await reader.client_id())
        conn = await _connection(reader)
        await conn.disconnect()
        assert reader.connection is conn
        await conn.send_packed_command(_packed((key, "0-0")), check_health=False)
        reply = await conn.read_response()
        assert [k for k, _ in _pairs(reply)] == [key]
        assert await reader.client_getname() == "contract-reconnects"
        assert int(await reader.client_id()) != first_id
        await reader.delete(key)


async def test_a_killed_reader_raises_what_the_relay_catches(
    redis_url: str, redis: Redis, keys: Keys
) -> None:
    async with single(redis_url) as reader:
        reader_id = int(await reader.client_id())
        conn = await _connection(reader)
        await conn.send_packed_command(
            _packed((keys.answer("contract-killed"), "0-0"), block_ms=30_000), check_health=False
        )
        reading = asyncio.create_task(conn.read_response())
        await asyncio.sleep(0.1)
        assert await redis.client_kill_filter(_id=str(reader_id)) == 1
        async with asyncio.timeout(5):
            with pytest.raises((RedisError, OSError)):
                await reading


async def test_a_cancelled_read_leaves_no_stale_reply(redis_url: str, keys: Keys) -> None:
    """The relay's own send-and-read (`_Reader._xread`) cancelled mid-block: the reply still
    owed must not be taken for the next command's."""
    key = keys.answer("contract-cancelled")
    async with single(redis_url) as reader:
        reading = asyncio.create_task(_Reader._xread(reader, _packed((key, "$"), block_ms=500)))
        await asyncio.sleep(0.1)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        await asyncio.sleep(0.6)  # past the block: a reply would be waiting on the old socket
        await reader.xadd(key, {"type": "chunk", "data": "fresh"})
        reply = await _Reader._xread(reader, _packed((key, "0-0")))
        ((got_key, raw),) = _pairs(reply)
        assert got_key == key and [flat for _, flat in raw] == [["type", "chunk", "data", "fresh"]]
        await reader.delete(key)


# -- python-engineio / python-socketio: the raw emit -------------------------------------------


class _Server:
    """A real python-socketio AsyncServer under uvicorn on a real port, with the options
    and packet class the gateway gives it, and the sids of connected clients."""

    def __init__(self, sio: socketio.AsyncServer, url: str) -> None:
        self.sio = sio
        self.url = url
        self.sids: list[str] = []
        self.gateway: SocketGateway | None = None


@asynccontextmanager
async def sio_server(
    settings: Settings | None = None,
) -> AsyncIterator[_Server]:
    """With `settings`, the gateway's server (a LeanServer) with its SocketGateway attached
    (as `server.gateway`); else python-socketio's own."""
    server_class = socketio.AsyncServer if settings is None else LeanServer
    sio = server_class(async_mode="asgi", serializer=TolerantPacket)
    port = free_port()
    server = _Server(sio, f"http://127.0.0.1:{port}")
    if settings is not None:
        server.gateway = SocketGateway(sio, _no_services, Access(settings))
    else:

        @sio.on("connect")  # type: ignore[untyped-decorator]
        async def on_connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
            server.sids.append(sid)

    config = uvicorn.Config(
        socketio.ASGIApp(sio), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    web = uvicorn.Server(config)
    task = asyncio.create_task(web.serve())
    try:
        async with asyncio.timeout(10):
            while not web.started:
                if task.done():
                    await task
                await asyncio.sleep(0.01)
        yield server
    finally:
        web.should_exit = True
        await asyncio.gather(task, return_exceptions=True)


def _no_services() -> Services:
    raise AssertionError("the contract tests send no events that need services")


def _event_packet(event: str, data: Any) -> str:
    """What gateway/sockets.py hands to engine.io for `sio.emit(event, data, to=sid)`."""
    return "2" + dumps([event, data])


PAYLOADS: list[Any] = [
    "START:abc;<br/>",
    'ünïcödé 🚀 \n\t"quotes" \\ </script>',
    "",
    {"id": "q", "entry_id": "1-2", "type": "chunk", "text": "t", "n": 3, "x": None},
    [1, "two", {"three": 3.5}],
]


def test_the_hand_built_packet_is_socketio_s_event_packet() -> None:
    """ "2" + JSON array is how python-socketio encodes an EVENT for the default namespace
    (no "/," prefix, no id); its JSON parses to the same value as the library's."""
    for data in PAYLOADS:
        library = sio_packet.Packet(sio_packet.EVENT, data=["chunk", data]).encode()
        assert isinstance(library, str) and library.startswith("2[")
        assert json.loads(library[1:]) == json.loads(_event_packet("chunk", data)[1:])
        decoded = sio_packet.Packet(encoded_packet=_event_packet("chunk", data))
        assert decoded.packet_type == sio_packet.EVENT
        assert (decoded.namespace, decoded.id) in ((None, None), ("/", None))
        assert decoded.data == ["chunk", data]


async def test_a_sid_maps_to_an_engineio_socket_with_a_queue() -> None:
    async with sio_server() as server, connected(server.url) as (_client, _got):
        await wait_for(lambda: len(server.sids) == 1)
        sid = server.sids[0]
        eio_sid = server.sio.manager.eio_sid_from_sid(sid, "/")
        assert isinstance(eio_sid, str) and eio_sid != sid
        sockets = server.sio.eio.sockets
        assert isinstance(sockets, dict) and eio_sid in sockets
        queue = sockets[eio_sid].queue
        # sockets.py pauses a watch on `queue.qsize()`, and only for an asyncio.Queue: any
        # other type would switch the backpressure off without a word.
        assert isinstance(queue, asyncio.Queue)
        assert queue.qsize() == 0
        assert sockets.get("no-such-sid") is None
    # Disconnected: no mapping left, so _emit returns instead of sending.
    await wait_for(lambda: server.sio.manager.eio_sid_from_sid(sid, "/") is None)
    assert eio_sid not in server.sio.eio.sockets


async def test_a_raw_engineio_send_arrives_as_the_event_sio_emit_sends() -> None:
    async with sio_server() as server, connected(server.url) as (_client, got):
        await wait_for(lambda: len(server.sids) == 1)
        sid = server.sids[0]
        eio_sid = server.sio.manager.eio_sid_from_sid(sid, "/")
        for data in PAYLOADS:
            await server.sio.eio.send(eio_sid, _event_packet("raw", data))
            await server.sio.emit("emitted", data, to=sid)
        await wait_for(lambda: len(got) == 2 * len(PAYLOADS))
    raw = [data for event, data in got if event == "raw"]
    emitted = [data for event, data in got if event == "emitted"]
    assert raw == emitted == PAYLOADS
    # In the order sent, interleaved as sent: one queue for both paths.
    assert [event for event, _ in got] == ["raw", "emitted"] * len(PAYLOADS)


async def test_the_serializer_is_the_gateway_s_tolerant_packet() -> None:
    """gateway/packets.py: `serializer=` takes a Packet subclass, and Packet.decode has read
    the packet type and id before it parses the JSON that fails."""
    sio = socketio.AsyncServer(async_mode="asgi", serializer=TolerantPacket)
    assert sio.packet_class is TolerantPacket
    deep = TolerantPacket(encoded_packet="27" + "[" * 100_000)
    assert (deep.packet_type, deep.id) == (sio_packet.EVENT, 7)
    assert deep.data == [UNREADABLE, "the event's JSON nests too deep"]
    broken = TolerantPacket(encoded_packet='2/chat,12["x", nope]')
    assert (broken.namespace, broken.id) == ("/chat", 12)
    assert broken.data == [UNREADABLE, "the event's JSON is not valid JSON"]
    fine = TolerantPacket(encoded_packet='23["ask",{"q":1}]')
    assert (fine.id, fine.data) == (3, ["ask", {"q": 1}])


async def _poll_of(cls: type[AsyncSocket], queued: list[Any], wait_s: float = 5.0) -> Any:
    """What `cls(...).poll()` returns (or the exception it raises) for `queued`, and what
    it leaves queued; with nothing queued, after `wait_s` of ping interval + timeout."""
    server = engineio.AsyncServer(
        async_mode="asgi", ping_interval=wait_s / 2, ping_timeout=wait_s / 2
    )
    socket = cls(server, "sid")
    for pkt in queued:
        socket.queue.put_nowait(pkt)
    try:
        got: Any = await socket.poll()
    except Exception as e:
        got = type(e)
    left = [socket.queue.get_nowait() for _ in range(socket.queue.qsize())]
    return got, left


async def test_the_lean_poll_keeps_engineio_s_poll_contract() -> None:
    """gateway/engine.py: LeanSocket.poll returns what AsyncSocket.poll returns, leaves
    what it leaves, and raises what it raises (QueueEmpty on timeout and on cancel)."""
    a, b, c = (eio_packet.Packet(eio_packet.MESSAGE, data=str(n)) for n in range(3))
    for queued in ([a], [a, b, c], [None], [a, None], [a, b, None, c], [None, a]):
        assert await _poll_of(LeanSocket, queued) == await _poll_of(AsyncSocket, queued)
    assert await _poll_of(LeanSocket, [], 0.1) == await _poll_of(AsyncSocket, [], 0.1)
    assert (await _poll_of(LeanSocket, [], 0.1))[0] is engineio.exceptions.QueueEmpty
    for cls in (LeanSocket, AsyncSocket):
        server = engineio.AsyncServer(async_mode="asgi")
        polling = asyncio.create_task(cls(server, "sid").poll())
        await asyncio.sleep(0.05)
        polling.cancel()
        with pytest.raises(engineio.exceptions.QueueEmpty):
            await polling
        # A packet queued while the poll waits is what it returns (no task in between).
        socket = cls(server, "sid")
        polling = asyncio.create_task(socket.poll())
        await asyncio.sleep(0.01)
        socket.queue.put_nowait(a)
        assert await polling == [a]


async def test_the_lean_poll_s_idle_limit_is_kept_across_waits() -> None:
    """gateway/engine.py: one timer per socket keeps the idle limit. A wait that outlasts it
    raises QueueEmpty and leaves the writer's task not cancelled; packets that come within
    it, wait after wait, never trip it, though the timer was armed by an earlier wait."""
    server = engineio.AsyncServer(async_mode="asgi", ping_interval=0.1, ping_timeout=0.1)
    socket = LeanSocket(server, "sid")
    loop = asyncio.get_running_loop()
    a = eio_packet.Packet(eio_packet.MESSAGE, data="a")
    for _ in range(5):  # 5 x 0.06 s: past the 0.2 s limit in all, never within one wait
        loop.call_later(0.06, socket.queue.put_nowait, a)
        assert await socket.poll() == [a]
    started = loop.time()
    with pytest.raises(engineio.exceptions.QueueEmpty):
        await socket.poll()
    assert 0.19 <= loop.time() - started < 1.0
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.01)  # still runs: not cancelled
    with pytest.raises(engineio.exceptions.QueueEmpty):  # and a later wait times out again
        await socket.poll()


class _GatedWebSocket:
    """engine.io's websocket wrapper as LeanSocket's handler uses it: `send` waits while
    `gate` is clear (a client that stopped reading) and may yield after writing, as a
    websocket's drain may; `wait` (the client's next packet) waits until `closed`."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.closed = asyncio.Event()
        self.sent: list[str] = []

    async def send(self, text: str) -> None:
        await self.gate.wait()
        self.sent.append(text)
        await asyncio.sleep(0)

    async def wait(self) -> None:
        await self.closed.wait()

    async def close(self) -> None:
        self.closed.set()


async def test_a_direct_write_held_by_the_client_keeps_what_is_queued_behind_it() -> None:
    """gateway/engine.py: while send_now's packets wait for the client, a packet queued
    meanwhile (a ping, another emit) goes out after all of them, not between them."""
    server = engineio.AsyncServer(async_mode="asgi")
    socket = LeanSocket(server, "sid")
    ws = _GatedWebSocket()
    handler = asyncio.create_task(socket._websocket_handler(ws))
    try:
        await wait_for(lambda: socket._waiting is not None)  # its writer is idle
        ws.gate.clear()
        direct = asyncio.create_task(socket.send_now(["4a", "4b", "4c"]))
        await wait_for(lambda: socket._sending is not None)
        await socket.send(eio_packet.Packet(eio_packet.MESSAGE, "q"))
        assert not await socket.send_now(["4not now"])  # one direct write at a time
        await asyncio.sleep(0.05)
        ws.gate.set()
        assert await direct
        await wait_for(lambda: len(ws.sent) == 4)
        assert ws.sent == ["4a", "4b", "4c", "4q"]
        await wait_for(lambda: socket._waiting is not None)  # the writer is back waiting
        assert await socket.send_now(["4d"])  # idle again
        assert ws.sent[-1] == "4d"
    finally:
        await ws.close()
        async with asyncio.timeout(5):
            await asyncio.gather(handler, return_exceptions=True)


async def test_a_write_from_a_callback_is_made_there_and_a_held_one_goes_on_in_a_task() -> None:
    """gateway/engine.py: `write_now` called outside any task (the relay's read callback)
    writes in that callback; held by the client (flow control), the rest of its packets go
    out from a task, and a packet queued meanwhile goes out after all of them."""
    server = engineio.AsyncServer(async_mode="asgi")
    socket = LeanSocket(server, "sid")
    ws = _GatedWebSocket()
    handler = asyncio.create_task(socket._websocket_handler(ws))
    loop = asyncio.get_running_loop()
    written: list[tuple[bool, list[str]]] = []

    def from_callback(texts: list[str]) -> None:
        assert asyncio.current_task() is None
        written.append((socket.write_now(texts), list(ws.sent)))

    try:
        await wait_for(lambda: socket._waiting is not None)  # its writer is idle
        loop.call_soon(from_callback, ["4a"])
        await wait_for(lambda: len(written) == 1)
        assert written[0] == (True, ["4a"]), "not written in the callback itself"
        await wait_for(lambda: socket._sending is None)
        ws.gate.clear()  # the client stops reading
        loop.call_soon(from_callback, ["4b", "4c"])
        await wait_for(lambda: len(written) == 2)
        assert written[1] == (True, ["4a"]) and socket._sending is not None
        await socket.send(eio_packet.Packet(eio_packet.MESSAGE, "q"))
        loop.call_soon(from_callback, ["4not now"])  # one direct write at a time
        await wait_for(lambda: len(written) == 3)
        assert not written[2][0]
        await asyncio.sleep(0.05)
        assert ws.sent == ["4a"]
        ws.gate.set()
        await wait_for(lambda: len(ws.sent) == 4)
        assert ws.sent == ["4a", "4b", "4c", "4q"]
        await wait_for(lambda: socket._waiting is not None and socket._sending is None)
        loop.call_soon(from_callback, ["4d"])  # idle again
        await wait_for(lambda: len(written) == 4)
        assert written[3][0] and ws.sent[-1] == "4d"
    finally:
        await ws.close()
        async with asyncio.timeout(5):
            await asyncio.gather(handler, return_exceptions=True)


async def test_the_gateway_s_engineio_sockets_are_lean(
    make_settings: Callable[..., Settings],
) -> None:
    """A client on a websocket from its first packet (as `connected` is) gets a LeanSocket
    too: LeanServer makes it one at engine.io's connect, before the websocket's handler
    runs, which send_now needs."""
    async with sio_server(make_settings()) as server, connected(server.url) as (_client, got):
        gateway = server.gateway
        assert gateway is not None
        await wait_for(lambda: len(gateway._watches) == 1)
        (sid,) = list(gateway._watches)
        eio_sid = server.sio.manager.eio_sid_from_sid(sid, "/")
        socket = server.sio.eio.sockets[eio_sid]
        assert type(socket) is LeanSocket
        await wait_for(lambda: socket._waiting is not None)  # the writer is idle
        assert await socket.send_now([_message("chunk", "one"), _message("chunk", "two")])
        await gateway._emit(sid, "chunk", "through the lean writer")
        await wait_for(lambda: ("chunk", "through the lean writer") in got)
        assert got == [("chunk", "one"), ("chunk", "two"), ("chunk", "through the lean writer")]
        # Something queued: the writer sends it, send_now writes nothing.
        socket.queue.put_nowait(eio_packet.Packet(eio_packet.MESSAGE, _event_packet("q", 1)))
        assert not await socket.send_now([_message("chunk", "not now")])
        await wait_for(lambda: ("q", 1) in got)
        assert ("chunk", "not now") not in got


async def test_a_socket_upgraded_from_polling_writes_straight_to_its_websocket(
    make_settings: Callable[..., Settings],
) -> None:
    """As a browser's socket.io-client connects: long-polling first, then the upgrade to a
    websocket, whose handler is LeanSocket's, so send_now reaches the client there too."""
    async with sio_server(make_settings()) as server:
        gateway = server.gateway
        assert gateway is not None
        client = socketio.AsyncClient(reconnection=False)
        got: list[Any] = []

        @client.on("chunk")  # type: ignore[untyped-decorator]
        async def on_chunk(data: Any) -> None:
            got.append(data)

        await client.connect(server.url, transports=["polling", "websocket"])
        try:
            await wait_for(lambda: len(gateway._watches) == 1)
            (sid,) = list(gateway._watches)
            socket = server.sio.eio.sockets[server.sio.manager.eio_sid_from_sid(sid, "/")]
            assert type(socket) is LeanSocket
            await wait_for(lambda: socket.upgraded and socket._waiting is not None)
            assert socket._ws is not None
            assert await socket.send_now([_message("chunk", "straight")])
            await gateway._emit_all(sid, [("chunk", i) for i in range(3)])
            await wait_for(lambda: len(got) == 4)
            assert got == ["straight", 0, 1, 2]
        finally:
            await client.disconnect()


def _message(event: str, data: Any) -> str:
    """An Engine.IO MESSAGE ("4") holding the gateway's Socket.IO EVENT packet."""
    return "4" + _event_packet(event, data)


# A client that stops reading: engine.io's writer blocks once the TCP buffers are full,
# and what is sent after that waits in the socket's queue.
BIG = "x" * 64 * 1024


@asynccontextmanager
async def stalled_client(url: str) -> AsyncIterator[ClientConnection]:
    """An engine.io v4 websocket client connected to "/", reading only when told to."""
    ws_url = url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
    async with ws_connect(ws_url, max_queue=1, max_size=None, compression=None) as ws:
        opened = await ws.recv()
        assert isinstance(opened, str) and opened.startswith("0{")
        await ws.send("40")
        joined = await ws.recv()
        assert isinstance(joined, str) and joined.startswith("40")
        yield ws


async def _read_events(ws: ClientConnection, n: int) -> list[Any]:
    """The next `n` Socket.IO events' [name, data], answering engine.io pings."""
    events: list[Any] = []
    while len(events) < n:
        message = await ws.recv()
        assert isinstance(message, str)
        if message == "2":
            await ws.send("3")
        elif message.startswith("42"):
            events.append(orjson.loads(message[2:]))
    return events


async def test_the_queue_counts_packets_a_stalled_client_has_not_taken() -> None:
    async with sio_server() as server, stalled_client(server.url) as ws:
        await wait_for(lambda: len(server.sids) == 1)
        eio_sid = server.sio.manager.eio_sid_from_sid(server.sids[0], "/")
        queue = server.sio.eio.sockets[eio_sid].queue
        n = 400
        for i in range(n):
            await server.sio.eio.send(eio_sid, _event_packet("big", [i, BIG]))
        await wait_for(lambda: queue.qsize() > SOCKET_QUEUE_MAX)
        async with asyncio.timeout(30):
            events = await _read_events(ws, n)
        assert [data[0] for _, data in events] == list(range(n))
        assert queue.qsize() == 0


async def test_a_stalled_websocket_client_holds_the_gateway_s_emits_in_order(
    make_settings: Callable[..., Settings],
) -> None:
    """SocketGateway._emit_all through the real engine.io on a websocket: its idle writer
    is skipped (send_now), so a client that stops reading holds the emitter in the
    websocket's flow control, with nothing queued; a packet queued meanwhile (engine.io's
    own send) waits for the held write, so once the client reads, everything arrives in
    the order sent."""
    async with sio_server(make_settings()) as server:
        gateway = server.gateway
        assert gateway is not None
        async with stalled_client(server.url) as ws:
            await wait_for(lambda: len(gateway.queued()) == 1)
            (sid,) = list(gateway._watches)
            eio_sid = server.sio.manager.eio_sid_from_sid(sid, "/")
            socket = server.sio.eio.sockets[eio_sid]
            n, per_batch = 600, 10
            batches = 0

            async def emit_all() -> None:
                nonlocal batches
                for first in range(0, n, per_batch):
                    await gateway._emit_all(
                        sid, [("chunk", [i, BIG]) for i in range(first, first + per_batch)]
                    )
                    batches += 1

            emitting = asyncio.create_task(emit_all())
            try:
                await wait_for(lambda: socket._sending is not None and batches > 0)
                held_at = -1
                while held_at != batches:  # until no batch is written for 0.3 s
                    held_at = batches
                    await asyncio.sleep(0.3)
                assert held_at < n // per_batch, "the emitter went on past a stalled client"
                assert socket._sending is not None, "the held write is not a direct one"
                assert gateway.queued() == [0]
                await server.sio.eio.send(eio_sid, _event_packet("queued", held_at))
                async with asyncio.timeout(60):
                    events = await _read_events(ws, n + 1)
                    await emitting
            finally:
                emitting.cancel()
            chunks = [data[0] for name, data in events if name == "chunk"]
            assert chunks == list(range(n))
            # After the whole batch that was being written when it was queued.
            names = [(name, data if name == "queued" else data[0]) for name, data in events]
            queued_at = names.index(("queued", held_at))
            assert queued_at >= (held_at + 1) * per_batch
        # Gone with its socket: nothing left to report, and an emit to it returns at once.
        await wait_for(lambda: gateway.queued() == [])
        async with asyncio.timeout(1):
            await gateway._emit(sid, "chunk", "after the end")


async def test_the_gateway_emit_waits_while_a_polling_client_s_queue_is_full(
    make_settings: Callable[..., Settings],
) -> None:
    """On long-polling the gateway's emits go through engine.io's queue (send_now writes
    nothing there). A client that stops polling holds the emitter at SOCKET_QUEUE_MAX queued
    packets instead of queueing without bound; once it polls again, everything arrives in
    order; `queued()` reports the queue."""
    async with (
        sio_server(make_settings()) as server,
        httpx.AsyncClient(base_url=server.url + "/socket.io/", timeout=30) as http,
    ):
        gateway = server.gateway
        assert gateway is not None
        opened = (await http.get("", params={"EIO": "4", "transport": "polling"})).text
        assert opened.startswith("0{")
        params = {"EIO": "4", "transport": "polling", "sid": orjson.loads(opened[1:])["sid"]}
        assert (await http.post("", params=params, content="40")).text == "OK"
        assert (await http.get("", params=params)).text.startswith("40")
        await wait_for(lambda: len(gateway.queued()) == 1)
        (sid,) = list(gateway._watches)
        socket = server.sio.eio.sockets[server.sio.manager.eio_sid_from_sid(sid, "/")]
        assert type(socket) is LeanSocket and not socket.upgraded
        assert not await socket.send_now([_message("chunk", "never")])  # a websocket's only
        n = 200
        sent = 0

        async def emit_all() -> None:
            nonlocal sent
            for i in range(n):
                await gateway._emit(sid, "chunk", i)
                sent += 1

        emitting = asyncio.create_task(emit_all())
        try:
            await wait_for(lambda: gateway.queued() == [SOCKET_QUEUE_MAX])
            stalled_at = sent
            await asyncio.sleep(0.3)
            assert sent == stalled_at < n, "the emitter went on while the queue was full"
            assert gateway.queued() == [SOCKET_QUEUE_MAX]
            got: list[Any] = []
            async with asyncio.timeout(60):
                while len(got) < n:
                    polled = (await http.get("", params=params)).text
                    got += [orjson.loads(p[2:]) for p in polled.split("\x1e") if p[:2] == "42"]
                await emitting
        finally:
            emitting.cancel()
        assert got == [["chunk", i] for i in range(n)]


# -- redis-py's cluster client: what connection.py's ClusterClient builds on ------------------
#
# connection.py retries a cluster pipeline's failed commands itself and forces a layout
# refresh after a failover: it reads `ClusterPipeline._execution_strategy._command_queue`
# (the queued PipelineCommands: `args`, `kwargs`, `result`), runs `ClusterPipeline.execute`
# and `reset`, and sets `RedisCluster._initialize`. `_execution_strategy` first appeared in
# redis-py 6.2 (a minor release): these internals move between minors.


@pytest.fixture(scope="module")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    cluster = ValkeyCluster(tmp_path_factory.mktemp("contract-cluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@asynccontextmanager
async def cluster(url: str) -> AsyncIterator[ClusterClient]:
    client = as_cluster(cluster_client(url, size=4, name="contract-cluster"))
    try:
        await client.initialize()
        yield client
    finally:
        await client.aclose()


@pytest.mark.cluster
async def test_setting_initialize_makes_the_next_command_reread_the_layout(
    valkey_cluster: ValkeyCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with cluster(valkey_cluster.url) as client:
        calls = 0
        reread = NodesManager.initialize

        async def counting(self: NodesManager, *args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return await reread(self, *args, **kwargs)

        monkeypatch.setattr(NodesManager, "initialize", counting)
        assert client._initialize is False, "initialised once"
        await client.set("contract:{a}", "1")
        assert calls == 0
        client._initialize = True  # what connection.py does after a failover
        assert await client.get("contract:{a}") == "1"
        assert calls == 1 and client._initialize is False
        client._initialize = True
        async with client.pipeline() as pipe:
            pipe.get("contract:{a}")
            assert await pipe.execute() == ["1"]
        assert calls == 2
        await client.delete("contract:{a}")


@pytest.mark.cluster
async def test_a_cluster_pipeline_exposes_its_queued_commands(
    valkey_cluster: ValkeyCluster,
) -> None:
    async with cluster(valkey_cluster.url) as client:
        pipe = ClusterPipeline(client)  # type: ignore[abstract]
        pipe.set("contract:{b}", "v")
        pipe.get("contract:{b}")
        pipe.incr("contract:{b}")  # fails: not an integer
        queue = list(pipe._execution_strategy._command_queue)  # type: ignore[attr-defined]
        assert [cmd.args for cmd in queue] == [
            ("SET", "contract:{b}", "v"),
            ("GET", "contract:{b}"),
            ("INCRBY", "contract:{b}", 1),
        ]
        assert all(isinstance(cmd.kwargs, dict) and cmd.result is None for cmd in queue)
        # As ClusterClient.run_bounded calls it: errors come back as results.
        results = await ClusterPipeline.execute(pipe, raise_on_error=False)
        assert results[:2] == [True, "v"] and isinstance(results[2], ResponseError)
        assert [cmd.result for cmd in queue][:2] == [True, "v"]
        assert isinstance(queue[2].result, ResponseError)
        await pipe.reset()  # type: ignore[no-untyped-call]
        assert pipe._execution_strategy._command_queue == []  # type: ignore[attr-defined]
        # A command re-queued from a PipelineCommand's args and kwargs runs as the original.
        again = ClusterPipeline(client)  # type: ignore[abstract]
        again.execute_command(*queue[1].args, **queue[1].kwargs)
        assert await again.execute() == ["v"]
        await client.delete("contract:{b}")


@pytest.mark.cluster
async def test_a_node_client_reaches_the_node_serving_a_key(
    valkey_cluster: ValkeyCluster,
) -> None:
    """The relay's cluster reader: `get_node_from_key` and a ClusterNode's host, port and
    connection_kwargs give a plain connection that may block on that slot's keys."""
    async with cluster(valkey_cluster.url) as client:
        key = "contract:{c}:answer"
        node = client.get_node_from_key(key)
        assert isinstance(node, ClusterNode)
        reader = node_client(node, name="contract-node-reader", block_ms=100)
        try:
            await client.xadd(key, {"type": "chunk", "data": "here"})
            reply = await _Reader._xread(reader, _packed((key, "0-0")))
            ((got_key, raw),) = _pairs(reply)
            assert got_key == key and raw[0][1] == ["type", "chunk", "data", "here"]
        finally:
            await reader.aclose()
            await client.delete(key)


# -- sse-starlette: the shutdown watcher the gateway's SSE streams wait on ----------------


def test_a_sigterm_to_uvicorn_sets_sse_starlettes_exit_flag() -> None:
    """Importing sse-starlette patches uvicorn's `Server.handle_exit` (what uvicorn installs
    for SIGINT/SIGTERM) to set `AppStatus.should_exit`."""
    assert uvicorn.Server.handle_exit is AppStatus.handle_exit
    assert AppStatus.enable_automatic_graceful_drain


async def test_the_exit_watcher_returns_once_the_server_exits() -> None:
    """`server_stopping()` (EventSourceResponse._listen_for_exit_signal) waits until the exit
    flag is set, then returns within its 0.5 s poll."""
    waiting = asyncio.create_task(server_stopping())
    try:
        await asyncio.sleep(0.7)
        assert not waiting.done()
        AppStatus.should_exit = True
        async with asyncio.timeout(5):
            await waiting
    finally:
        AppStatus.should_exit = False
        waiting.cancel()
