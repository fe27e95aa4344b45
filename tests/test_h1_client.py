"""The model's HTTP/1.1 client (`providers.h1`, `providers.h1pool`) against real local
servers: bodies, keep-alive, connections that break, timeouts, TLS, redirects, proxies."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.support.rawhttp import (
    Handler,
    Peer,
    RawServer,
    chunk,
    hanging_listener,
    head,
    self_signed,
    server_tls,
)
from tokenrelay.errors import ConfigError
from tokenrelay.providers.h1 import HTTPFailure, HTTPTimeout
from tokenrelay.providers.h1pool import H1Client, Response

KEY = "Bearer sk-h1-test"
MakeClient = Callable[..., H1Client]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    made: list[H1Client] = []

    def make(**kw: object) -> H1Client:
        options: dict[str, object] = {
            "connect_timeout_s": 5.0,
            "read_timeout_s": 5.0,
            "max_idle": 4,
            "keepalive_s": 5.0,
            **kw,
        }
        made.append(H1Client({"authorization": KEY, "user-agent": "t"}, **options))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for client in made:
        await client.aclose()


async def _whole(response: Response) -> bytes:
    out = b""
    try:
        while data := await response.read():
            out += data
    finally:
        response.close()
    return out


def _answering(
    body: bytes, *, chunked: bool = True, piece: int = 0, headers: dict[str, str] | None = None
) -> Handler:
    """A handler that answers every request on its connection with `body`."""

    async def handle(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.respond(body, chunked=chunked, piece=piece, headers=headers)

    return handle


async def test_a_chunked_body_is_read_as_it_arrives(make_client: MakeClient) -> None:
    first_read = asyncio.Event()

    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(head(200, {"content-type": "text/event-stream"}) + chunk(b"data: 1\n\n"))
        await first_read.wait()  # the rest only once the client has read the first chunk
        await peer.send(chunk(b"data: 2\n\n") + chunk(b"data: 3\n\n") + b"0\r\n\r\n")

    async with RawServer(handle) as server:
        response = await make_client().post(server.url + "/v1/chat", b'{"q": 1}')
        assert response.status == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert await response.read() == b"data: 1\n\n"
        first_read.set()
        assert await _whole(response) == b"data: 2\n\ndata: 3\n\n"
    request = server.requests[0]
    assert (request.method, request.target, request.body) == ("POST", "/v1/chat", b'{"q": 1}')
    assert request.headers["authorization"] == KEY
    assert request.headers["host"] == server.url.removeprefix("http://")


@pytest.mark.parametrize("chunked", [True, False])
async def test_answers_reuse_one_kept_alive_connection(
    make_client: MakeClient, chunked: bool
) -> None:
    body = b"x" * 10_000
    async with RawServer(_answering(body, chunked=chunked, piece=999)) as server:
        client = make_client()
        for _ in range(3):
            assert await _whole(await client.post(server.url, b"{}")) == body
    assert server.connections == 1
    assert len(server.requests) == 3


async def test_a_new_connection_rather_than_a_wait_and_only_max_idle_kept(
    make_client: MakeClient,
) -> None:
    both_asked = asyncio.Event()
    ended: list[int] = []

    async def handle(peer: Peer) -> None:
        while await peer.request() is not None:
            if len(peer.server.requests) == 2:
                both_asked.set()
            await both_asked.wait()  # answers only once two requests are in flight at once
            await peer.respond(b"ok")
        ended.append(peer.number)

    async with RawServer(handle) as server:
        client = make_client(max_idle=1)
        bodies = await asyncio.gather(*(_answer(client, server.url) for _ in range(2)))
        assert bodies == [b"ok", b"ok"] and server.connections == 2
        for _ in range(50):  # the connection beyond max_idle is closed
            if ended:
                break
            await asyncio.sleep(0.01)
        assert len(ended) == 1
        assert await _answer(client, server.url) == b"ok"  # on the one kept
    assert server.connections == 2


async def _answer(client: H1Client, url: str) -> bytes:
    return await _whole(await client.post(url, b"{}"))


async def test_a_connection_the_server_closed_while_idle_is_not_used(
    make_client: MakeClient,
) -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.respond(b"once")
        peer.close()  # keep-alive said nothing against it; the server just hangs up

    async with RawServer(handle) as server:
        client = make_client()
        assert await _answer(client, server.url) == b"once"
        await asyncio.sleep(0.05)  # the close reaches the client
        assert await _answer(client, server.url) == b"once"
    assert server.connections == 2
    assert len(server.requests) == 2


async def test_a_stale_connection_is_retried_once_on_a_new_one(make_client: MakeClient) -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.respond(b"fresh")
        if peer.number == 1:
            # The race: the server closes its idle connection as the next request arrives.
            await peer.request()
            peer.writer.transport.abort()

    async with RawServer(handle) as server:
        client = make_client()
        assert await _answer(client, server.url) == b"fresh"
        assert await _answer(client, server.url) == b"fresh"
    assert server.connections == 2
    assert len(server.requests) == 3  # the one lost on the stale connection, sent again


async def test_a_new_connection_closed_without_a_reply_is_a_failure(
    make_client: MakeClient,
) -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        peer.close()

    async with RawServer(handle) as server:
        with pytest.raises(HTTPFailure, match="without sending a response"):
            await make_client().post(server.url, b"{}")
    assert server.connections == 1  # not retried: it was not a kept-alive connection


@pytest.mark.parametrize("chunked", [True, False])
async def test_a_server_dying_mid_body_is_a_failure(make_client: MakeClient, chunked: bool) -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(head(200, chunked=chunked, length=100))
        await peer.send(chunk(b"data: 1\n\n") if chunked else b"data: 1\n\n")
        await asyncio.sleep(0.05)
        peer.writer.transport.abort()

    async with RawServer(handle) as server:
        response = await make_client().post(server.url, b"{}")
        assert await response.read() == b"data: 1\n\n"
        with pytest.raises(HTTPFailure) as info:
            await response.read()
        response.close()
    assert not isinstance(info.value, HTTPTimeout)
    assert "complete message body" in str(info.value)


async def test_a_body_without_a_length_ends_with_the_connection(make_client: MakeClient) -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        peer.close()

    async with RawServer(handle) as server:
        client = make_client()
        assert await _answer(client, server.url) == b"all of it"
        assert await _answer(client, server.url) == b"all of it"
    assert server.connections == 2


async def test_an_informational_reply_comes_before_the_response(make_client: MakeClient) -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n")
        await peer.respond(b"real", status=201, headers={"x-a": "1"})

    async with RawServer(handle) as server:
        response = await make_client().post(server.url, b"{}")
        assert (response.status, response.headers.get("x-a"), "link" in response.headers) == (
            201,
            "1",
            False,
        )
        assert await _whole(response) == b"real"


async def test_slow_headers_time_out(make_client: MakeClient) -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        await asyncio.sleep(10)

    async with RawServer(handle) as server:
        started = time.monotonic()
        with pytest.raises(HTTPTimeout):
            await make_client(read_timeout_s=0.3).post(server.url, b"{}")
        assert 0.25 < time.monotonic() - started < 3


async def test_a_stall_mid_body_times_out_and_each_read_restarts_the_clock(
    make_client: MakeClient,
) -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(head())
        for n in range(4):  # a piece every 0.2 s: each within the 0.4 s timeout
            await peer.send(chunk(b"%d" % n))
            await asyncio.sleep(0.2)
        await asyncio.sleep(10)

    async with RawServer(handle) as server:
        response = await make_client(read_timeout_s=0.4).post(server.url, b"{}")
        got: list[bytes] = []

        async def read_all() -> None:
            while data := await response.read():
                got.append(data)

        with pytest.raises(HTTPTimeout):
            await read_all()
        response.close()
    assert b"".join(got) == b"0123"


async def test_a_connection_left_mid_body_is_never_reused(make_client: MakeClient) -> None:
    ended: list[int] = []

    async def handle(peer: Peer) -> None:
        try:
            while await peer.request() is not None:
                await peer.respond(b"data: 1\n\n" * 100, piece=9)
        finally:  # a write to a connection the client closed ends here too
            ended.append(peer.number)

    async with RawServer(handle) as server:
        client = make_client()
        response = await client.post(server.url, b"{}")
        assert await response.read()
        response.close()  # before the body's end
        assert await _answer(client, server.url) == b"data: 1\n\n" * 100
        assert server.connections == 2
        for _ in range(50):
            if ended:
                break
            await asyncio.sleep(0.01)
        assert ended == [1]


async def test_a_gzip_body_is_decoded(make_client: MakeClient) -> None:
    text = b"data: zipped\n\n" * 50
    packed = gzip.compress(text)
    async with RawServer(_answering(packed, headers={"content-encoding": "gzip"}, piece=7)) as s:
        assert await _answer(make_client(), s.url) == text
    assert "gzip" in s.requests[0].headers["accept-encoding"]


async def test_an_unknown_encoding_is_a_failure_and_closes(make_client: MakeClient) -> None:
    ended: list[int] = []

    async def handle(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.respond(b"??", headers={"content-encoding": "br"})
        ended.append(peer.number)

    async with RawServer(handle) as server:
        with pytest.raises(HTTPFailure, match="'br'"):
            await make_client().post(server.url, b"{}")
        for _ in range(50):
            if ended:
                break
            await asyncio.sleep(0.01)
    assert ended == [1]


async def test_connection_refused_is_a_failure(make_client: MakeClient) -> None:
    async with RawServer(_answering(b"")) as server:
        url = server.url
    with pytest.raises(HTTPFailure) as info:
        await make_client().post(url, b"{}")
    assert not isinstance(info.value, HTTPTimeout)


async def test_a_connect_that_hangs_times_out(make_client: MakeClient) -> None:
    with hanging_listener() as port:
        started = time.monotonic()
        with pytest.raises(HTTPTimeout, match="connect"):
            await make_client(connect_timeout_s=0.3).post(f"http://127.0.0.1:{port}", b"{}")
        assert 0.25 < time.monotonic() - started < 3


@pytest.mark.parametrize("status", [307, 308])
async def test_a_redirect_keeps_the_post_and_drops_the_key_for_another_origin(
    make_client: MakeClient, status: int
) -> None:
    async with (
        RawServer(_answering(b"there")) as other,
        RawServer(_answering(b"here")) as same,
    ):

        async def handle(peer: Peer) -> None:
            while (request := await peer.request()) is not None:
                to = same.url if request.target == "/same" else other.url + "/moved"
                await peer.respond(b"", status=status, headers={"location": to})

        async with RawServer(handle) as first:
            client = make_client()
            assert await _answer(client, first.url + "/other") == b"there"
            assert await _answer(client, first.url + "/same") == b"here"
    moved = other.requests[0]
    assert (moved.method, moved.target, moved.body) == ("POST", "/moved", b"{}")
    assert "authorization" not in moved.headers  # another origin: the key stays home
    # `same` listens on another port: another origin as well (a same-origin redirect keeps
    # the key: the 303 test).
    assert "authorization" not in same.requests[0].headers


async def test_a_303_becomes_a_get_without_the_body(make_client: MakeClient) -> None:
    async def handle(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            if request.target == "/post":
                await peer.respond(b"see other", status=303, headers={"location": "/get"})
            else:
                await peer.respond(b"got")

    async with RawServer(handle) as server:
        assert await _answer(make_client(), server.url + "/post") == b"got"
    get = server.requests[1]
    assert (get.method, get.body, "content-length" in get.headers) == ("GET", b"", False)
    assert get.headers["authorization"] == KEY  # the same origin


async def test_through_an_http_proxy(make_client: MakeClient) -> None:
    async with RawServer(_answering(b"via proxy")) as proxy:
        host = proxy.url.removeprefix("http://")
        client = make_client(proxies={"http": f"http://user:p%40ss@{host}"})
        assert await _answer(client, "http://model.invalid:8000/v1/chat") == b"via proxy"
    request = proxy.requests[0]
    assert request.target == "http://model.invalid:8000/v1/chat"
    assert request.headers["host"] == "model.invalid:8000"
    assert request.headers["proxy-authorization"] == "Basic dXNlcjpwQHNz"  # user:p@ss


async def test_no_proxy_goes_direct(make_client: MakeClient) -> None:
    async with RawServer(_answering(b"direct")) as server:
        client = make_client(proxies={"http": "http://127.0.0.1:9", "no": "127.0.0.1"})
        assert await _answer(client, server.url) == b"direct"


def test_a_socks_proxy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="proxies only"):
        H1Client(
            {},
            connect_timeout_s=1,
            read_timeout_s=1,
            max_idle=1,
            keepalive_s=1,
            proxies={"https": "socks5://127.0.0.1:1080"},
        )


# TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


async def test_tls_with_a_trusted_certificate(
    make_client: MakeClient, certificate: tuple[Path, Path]
) -> None:
    trusting = ssl.create_default_context(cafile=str(certificate[0]))
    async with RawServer(_answering(b"secret"), tls=server_tls(certificate)) as server:
        client = make_client(ssl_context=trusting)
        for _ in range(2):
            assert await _answer(client, server.url) == b"secret"
    assert server.connections == 1


async def test_tls_with_an_unknown_certificate_is_refused(
    make_client: MakeClient, certificate: tuple[Path, Path]
) -> None:
    async with RawServer(_answering(b"secret"), tls=server_tls(certificate)) as server:
        with pytest.raises(HTTPFailure, match="CERTIFICATE_VERIFY_FAILED"):
            await make_client().post(server.url, b"{}")
    assert not server.requests


async def test_tls_through_a_connect_tunnel(
    make_client: MakeClient, certificate: tuple[Path, Path]
) -> None:
    async with RawServer(_answering(b"tunnelled"), tls=server_tls(certificate)) as origin:
        asked: list[bytes] = []

        async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            asked.append(await reader.readuntil(b"\r\n\r\n"))
            port = int(origin.url.rsplit(":", 1)[1])
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                while data := await src.read(65536):
                    dst.write(data)
                dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        proxy = await asyncio.start_server(tunnel, "127.0.0.1", 0)
        try:
            port = proxy.sockets[0].getsockname()[1]
            client = make_client(
                ssl_context=ssl.create_default_context(cafile=str(certificate[0])),
                proxies={"https": f"http://127.0.0.1:{port}"},
            )
            assert await _answer(client, origin.url + "/v1") == b"tunnelled"
        finally:
            proxy.close()
    where = origin.url.removeprefix("https://").encode()
    assert asked[0].startswith(b"CONNECT " + where + b" HTTP/1.1\r\n")
    assert origin.requests[0].target == "/v1"
