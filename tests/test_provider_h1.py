"""The openai provider on its own HTTP/1.1 client, against scripted local servers: what a
connection that breaks, a silent server, a stale keep-alive and TLS report."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from pydantic import SecretStr

from tests.support.rawhttp import (
    Peer,
    RawServer,
    chunk,
    hanging_listener,
    head,
    self_signed,
    server_tls,
)
from tokenrelay.errors import ProviderError
from tokenrelay.providers import openai
from tokenrelay.providers.base import Finish, Item, Prompt
from tokenrelay.providers.openai import OpenAIProvider
from tokenrelay.settings import Settings

SECRET = "sk-h1-provider-0123456789abcdef"


def _chunk(content: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish}
    return b"data: " + orjson.dumps({"choices": [choice]}) + b"\n\n"


ANSWER = _chunk("Hello") + _chunk(" world", "stop") + b"data: [DONE]\n\n"


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)


def _provider(url: str, **settings: object) -> OpenAIProvider:
    values: dict[str, object] = {
        "openai_api_key": SecretStr(SECRET),
        "openai_base_url": f"{url}/v1",
        "openai_model": "m",
        "provider_max_retries": 0,
        **settings,
    }
    return OpenAIProvider.from_settings(Settings(_env_file=None, **values))  # type: ignore[arg-type]


async def _answer(provider: OpenAIProvider, into: list[Item] | None = None) -> list[Item]:
    items = [] if into is None else into
    try:
        async for item in provider.stream(Prompt("Redis", "h1?")):
            items.append(item)
    finally:
        await provider.aclose()
    return items


async def test_a_connection_broken_mid_answer_is_incomplete_and_retryable() -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.send(head(200, {"content-type": "text/event-stream"}))
        await peer.send(chunk(_chunk("partial")))
        peer.writer.transport.abort()

    seen: list[Item] = []
    async with RawServer(handle) as server:
        with pytest.raises(ProviderError) as info:
            await _answer(_provider(server.url), seen)
    assert seen == ["partial"]
    error = info.value
    assert (error.kind, error.retryable) == ("incomplete", True)
    assert f"the connection to {server.url}/v1 broke mid-answer" in error.message
    assert SECRET not in error.message


async def test_a_server_that_never_answers_times_out() -> None:
    async def handle(peer: Peer) -> None:
        await peer.request()
        await peer.reader.read()  # never a reply

    async with RawServer(handle) as server:
        provider = _provider(server.url, first_token_timeout_s=0.3, stall_timeout_s=0.3)
        with pytest.raises(ProviderError) as info:
            await _answer(provider)
    assert (info.value.kind, info.value.retryable) == ("timeout", True)


async def test_a_connect_that_hangs_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai, "_CONNECT_TIMEOUT_S", 0.3)  # 10 s in earnest
    with hanging_listener() as port, pytest.raises(ProviderError) as info:
        await _answer(_provider(f"http://127.0.0.1:{port}"))
    assert (info.value.kind, info.value.retryable) == ("timeout", True)


async def test_answers_share_a_connection_and_survive_its_silent_close() -> None:
    async def handle(peer: Peer) -> None:
        for _ in range(2 if peer.number == 1 else 100):
            if await peer.request() is None:
                return
            await peer.respond(ANSWER, headers={"content-type": "text/event-stream"}, piece=11)
        await peer.request()  # the third request on the first connection: closed unanswered
        peer.writer.transport.abort()

    async with RawServer(handle) as server:
        provider = _provider(server.url)
        try:
            for _ in range(4):
                items = [i async for i in provider.stream(Prompt("Redis", "again?"))]
                assert items == ["Hello", " world", Finish("stop")]
        finally:
            await provider.aclose()
    assert server.connections == 2
    assert len(server.requests) == 5  # the one the first connection dropped, sent again


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


async def test_https_with_the_ca_named_in_ssl_cert_file(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def handle(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.respond(ANSWER, piece=11)

    async with RawServer(handle, tls=server_tls(certificate)) as server:
        with pytest.raises(ProviderError) as info:
            await _answer(_provider(server.url))  # certifi's CAs do not know it
        assert info.value.kind == "connection"
        assert "CERTIFICATE_VERIFY_FAILED" in info.value.message
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # as httpx read it
        assert await _answer(_provider(server.url)) == ["Hello", " world", Finish("stop")]
    assert server.url.startswith("https://")
    assert len(server.requests) == 1


async def test_refusals_carry_the_status_and_headers() -> None:
    refusal = orjson.dumps({"error": {"message": f"slow down, {SECRET}"}})

    async def handle(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.respond(
                refusal, status=429, headers={"retry-after-ms": "1500"}, chunked=False
            )

    async with RawServer(handle) as server:
        with pytest.raises(ProviderError) as info:
            await _answer(_provider(server.url))
    error = info.value
    assert (error.kind, error.retryable, error.retry_after_s) == ("rate_limit", True, 1.5)
    assert "slow down" in error.message and SECRET not in error.message
    assert "Error code: 429" in str(error.__cause__)
