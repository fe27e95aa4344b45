"""Connections that tokenrelay takes over from redis-py (`connection.TakenOver`: each Lane's,
the relay's doorbell) over TLS, against a real Redis listening with TLS only, on asyncio's
loop and on uvloop (the worker's and the gateway's): `transport.set_protocol` on an SSL
transport hands the decrypted bytes to tokenrelay's protocol, and a close through redis-py
still completes.

The embedded Valkey is built without TLS; this uses the machine's `redis-server` (Debian's
is built with it) and `openssl` for a certificate, and is skipped where either is missing.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from tests.support.net import free_port
from tokenrelay.connection import Lane, pack
from tokenrelay.relay import _Doorbell
from tokenrelay.services import make_store
from tokenrelay.settings import Settings
from tokenrelay.wire import Entry, EntryType
from tokenrelay.worker import ChunkWriter

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(scope="module")
def tls_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `rediss://` URL of a Redis that listens with TLS only (self-signed certificate)."""
    server, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if server is None or openssl is None:
        pytest.skip("needs redis-server and openssl on PATH")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    process = subprocess.Popen(
        [
            *(server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
            *("--tls-cert-file", str(cert), "--tls-key-file", str(key)),
            *("--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"),
            *("--save", "", "--appendonly", "no", "--dir", str(folder)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    try:
        _until_up(url, process)
        yield url
    finally:
        process.terminate()
        process.communicate(timeout=10)  # and its output's pipe closed


def _until_up(url: str, process: subprocess.Popen[bytes]) -> None:
    until = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            output = process.stdout.read().decode() if process.stdout else ""
            if "TLS" in output:
                pytest.skip(f"this redis-server has no TLS: {output.strip()[-200:]}")
            raise RuntimeError(f"redis-server with TLS did not start: {output}")
        try:
            with SyncRedis.from_url(url) as client:
                client.ping()
            return
        except Exception:
            if time.monotonic() > until:
                raise
            time.sleep(0.05)


def _on(loop: str, main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(main, 30))


@pytest.mark.parametrize("loop", LOOPS)
def test_a_lane_over_tls(tls_url: str, loop: str) -> None:
    """Exchanges, one begun in the caller's turn (`Lane.start`), a connection Redis closed
    while idle opened again, and a close that completes."""

    async def main() -> None:
        client = Redis.from_url(tls_url, decode_responses=True)
        lane = Lane(client, "-tls")
        try:
            both = pack(["SET", "tls:k", "ünï"]) + pack(["GET", "tls:k"])
            assert await lane.exchange(both, 2) == ["OK", "ünï"]
            started = lane.start(pack(["ECHO", "at once"]), 1)
            assert started is not None
            assert await started == ["at once"]
            clients: Any = await client.client_list()
            mine = [c["id"] for c in clients if c.get("name", "").endswith("-tls")]
            assert len(mine) == 1 and await client.client_kill_filter(_id=mine[0]) == 1
            assert await lane.exchange(pack(["ECHO", "again"]), 1) == ["again"]
        finally:
            await lane.aclose()
            await client.aclose()

    _on(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_the_doorbell_over_tls(tls_url: str, loop: str) -> None:
    """SUBSCRIBE confirmed, a PUBLISH heard with its bytes as sent, and closing the
    connection through redis-py ends `lost`."""

    class Heard:
        def __init__(self) -> None:
            self.replies: asyncio.Queue[Any] = asyncio.Queue()

        def _heard(self, reply: Any) -> None:
            self.replies.put_nowait(reply)

    async def main() -> None:
        heard = Heard()
        async with Redis.from_url(tls_url, single_connection_client=True) as listener:
            await listener.initialize()
            conn = listener.connection
            assert conn is not None
            bell = _Doorbell(heard, conn)  # type: ignore[arg-type]
            bell.send(pack(["SUBSCRIBE", "tls:bell"]))
            assert await heard.replies.get() == [b"subscribe", b"tls:bell", 1]
            async with Redis.from_url(tls_url) as publisher:
                assert await publisher.publish("tls:bell", '[["ring"]]') == 1
            assert await heard.replies.get() == [b"message", b"tls:bell", b'[["ring"]]']
            await conn.disconnect()
            assert "closed" in str(await bell.lost)

    _on(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_the_chunk_writer_over_tls(
    tls_url: str, loop: str, make_settings: Callable[..., Settings]
) -> None:
    """An answer's chunks written by the worker's writer, its batches begun in callbacks
    on its lane, read back whole."""

    async def main() -> None:
        client = Redis.from_url(tls_url, decode_responses=True)
        store = make_store(make_settings(), client)
        writer = ChunkWriter(store)
        await writer.connect()
        try:
            asked = await store.ask("t", "q")
            box = writer.outbox(asked.id, *(await store.begin_answer(asked.id)))
            for n in range(50):
                box.put(Entry(EntryType.CHUNK, f"{n} "))
                if n % 7 == 0:
                    await asyncio.sleep(0.001)
            await box.drain()
            entries = await store.read_all(asked.id)
            assert "".join(e.text for e in entries) == "".join(f"{n} " for n in range(50))
            assert writer.batches >= 2
        finally:
            await writer.stop()
            await client.aclose()

    _on(loop, main())
