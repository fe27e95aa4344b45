"""The openai provider's own HTTP reading: SSE decoding, the SDK's retry rules, keep-alive,
shapes the mock model does not send (from a scripted local server)."""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from tests.support.rawhttp import Peer, RawServer
from tokenrelay.errors import ProviderError
from tokenrelay.providers.base import Finish, Item, Prompt
from tokenrelay.providers.h1 import Connection, HTTPStatusError, Origin
from tokenrelay.providers.h1pool import H1Client
from tokenrelay.providers.openai import OpenAIProvider
from tokenrelay.providers.retry import retry_after_s, retry_delay_s, should_retry
from tokenrelay.providers.sse import SSEDecoder
from tokenrelay.settings import Settings
from tokenrelay.testing import MockLLM, answer_text, directive

STREAM = (
    b'data: {"a":1}\n\n'
    b": keep-alive comment\n\n"
    b"data:no-space\ndata: second line\n\n"
    b"event: message\nid: 7\ndata: [DONE]\n\n"
)
EVENTS = [b'{"a":1}', b"no-space\nsecond line", b"[DONE]"]


def _pieces(body: bytes, size: int) -> Iterator[bytes]:
    return (body[i : i + size] for i in range(0, len(body), size))


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_sse_events_whatever_the_line_ends_and_the_reads(newline: bytes, size: int) -> None:
    decoder = SSEDecoder()
    body = STREAM.replace(b"\n", newline)
    assert [e for piece in _pieces(body, size) for e in decoder.feed(piece)] == EVENTS


def test_sse_unfinished_event_waits_for_its_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a":1}\n') == []
    assert decoder.feed(b"\n") == [b'{"a":1}']


@pytest.mark.parametrize(
    ("status", "headers", "retried"),
    [
        (429, {}, True),
        (500, {}, True),
        (503, {}, True),
        (408, {}, True),
        (409, {}, True),
        (400, {}, False),
        (401, {}, False),
        (404, {}, False),
        (400, {"x-should-retry": "true"}, True),
        (503, {"x-should-retry": "false"}, False),
        (429, {"retry-after": "121"}, False),  # longer than the SDK waits
        (429, {"retry-after": "120"}, True),
    ],
)
def test_which_statuses_are_retried(status: int, headers: dict[str, str], retried: bool) -> None:
    assert should_retry(status, headers) is retried


def test_retry_waits_what_the_server_asks_within_two_minutes() -> None:
    assert retry_delay_s(0, {"retry-after": "3"}) == 3.0
    assert retry_delay_s(0, {"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_delay_s(0, {"retry-after": date}) <= 30


@pytest.mark.parametrize("headers", [None, {}, {"retry-after": "0"}, {"retry-after": "999"}])
def test_retry_backs_off_otherwise(headers: dict[str, str] | None) -> None:
    for attempt, full_s in [(0, 0.5), (1, 1.0), (2, 2.0), (4, 8.0), (10, 8.0)]:
        delay_s = retry_delay_s(attempt, headers)
        assert 0.75 * full_s <= delay_s <= full_s


def test_retry_after_reported_to_the_caller() -> None:
    assert retry_after_s({"retry-after": "0.02"}) == pytest.approx(0.02)
    assert retry_after_s({"retry-after-ms": "1500"}) == pytest.approx(1.5)
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_s({}) is None


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The TCP connections the provider opens, counted as they are opened."""
    opened: list[str] = []
    connect = H1Client._connect

    async def counting(self: H1Client, origin: Origin) -> Connection:
        opened.append(f"{origin.host}:{origin.port}")
        return await connect(self, origin)

    monkeypatch.setattr(H1Client, "_connect", counting)
    return opened


@pytest.fixture
async def provider(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[MockLLM, Any]]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)  # these tests count direct connections
    async with MockLLM() as mock:
        settings = Settings(
            _env_file=None, openai_api_key=SecretStr("sk-lean"), openai_base_url=mock.base_url
        )
        made = OpenAIProvider.from_settings(settings)
        try:
            yield mock, made
        finally:
            await made.aclose()


async def _answer(provider: OpenAIProvider, question: str) -> list[Item]:
    return [item async for item in provider.stream(Prompt("Redis", question))]


async def test_answers_reuse_one_kept_alive_connection(
    provider: tuple[MockLLM, OpenAIProvider], connections: list[str]
) -> None:
    _, openai = provider
    for n in range(3):
        question = f"Again {n}? " + directive(tokens=5)
        items = await _answer(openai, question)
        assert "".join(str(i) for i in items[:-1]) == answer_text(question)
        assert isinstance(items[-1], Finish)
    assert len(connections) == 1


async def test_a_retry_after_a_refusal_reuses_the_connection(
    provider: tuple[MockLLM, OpenAIProvider], connections: list[str]
) -> None:
    mock, openai = provider
    question = "Twice? " + directive(tokens=3, fail=503, fail_times=1, retry_after=0.01)
    items = await _answer(openai, question)
    assert isinstance(items[-1], Finish)
    assert mock.requests_for("Twice?") == 2
    assert len(connections) == 1


async def test_leaving_mid_answer_drops_that_connection_only(
    provider: tuple[MockLLM, OpenAIProvider], connections: list[str]
) -> None:
    mock, openai = provider
    stream = openai.stream(Prompt("Redis", "Long? " + directive(tokens=500, rate=100)))
    assert isinstance(await anext(stream), str)
    await stream.aclose()  # type: ignore[attr-defined]
    items = await _answer(openai, "Next? " + directive(tokens=2))
    assert isinstance(items[-1], Finish)
    assert len(connections) == 2  # a half-read response cannot be reused
    assert mock.active_streams == 0


SECRET = "sk-shapes-0123456789abcdef"


def _chunk(content: str | None = None, finish: str | None = None, **extra: object) -> bytes:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + orjson.dumps({"choices": [choice], **extra}) + b"\n\n"


@contextlib.asynccontextmanager
async def _serving(
    *bodies: bytes | tuple[int, dict[str, str], bytes],
) -> AsyncIterator[tuple[OpenAIProvider, list[int]]]:
    """A provider answered with the next body (or status, headers, body) by a real local
    server, in chunks of a few bytes."""
    seen: list[int] = []

    async def handle(peer: Peer) -> None:
        while await peer.request() is not None:
            seen.append(1)
            given = bodies[min(len(seen), len(bodies)) - 1]
            status, headers, body = given if isinstance(given, tuple) else (200, {}, given)
            await peer.respond(body, status=status, headers=headers, piece=7)

    async with RawServer(handle) as server:
        settings = Settings(
            _env_file=None,
            openai_api_key=SecretStr(SECRET),
            openai_base_url=f"{server.url}/v1",
            openai_model="m",
            provider_max_retries=1,
        )
        provider = OpenAIProvider.from_settings(settings)
        try:
            yield provider, seen
        finally:
            await provider.aclose()


async def _collect_from(*bodies: bytes | tuple[int, dict[str, str], bytes]) -> list[Item]:
    async with _serving(*bodies) as (provider, _):
        return await _answer(provider, "shape?")


async def test_usage_chunk_with_null_choices_comments_and_crlf() -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 2}
    body = (
        b": ping\r\n\r\n"
        + _chunk("Hello").replace(b"\n", b"\r\n")
        + _chunk(" there", "stop")
        + b"data: "
        + orjson.dumps({"choices": None, "usage": usage})
        + b"\n\ndata: [DONE]\n\n"
    )
    assert await _collect_from(body) == ["Hello", " there", Finish("stop", 7, 2)]


async def test_a_compressed_stream_is_decoded() -> None:
    body = gzip.compress(_chunk("zipped", "stop") + b"data: [DONE]\n\n")
    assert await _collect_from((200, {"content-encoding": "gzip"}, body)) == [
        "zipped",
        Finish("stop"),
    ]


async def test_an_error_event_mid_stream_is_a_server_error_without_the_key() -> None:
    error = {"error": {"message": f"overloaded, key {SECRET}", "type": "server_error"}}
    body = _chunk("partial") + b"data: " + orjson.dumps(error) + b"\n\n"
    seen: list[Item] = []

    async def collect() -> None:
        async with _serving(body) as (provider, _):
            async for item in provider.stream(Prompt("Redis", "shape?")):
                seen.append(item)

    with pytest.raises(ProviderError) as info:
        await collect()
    assert seen == ["partial"]
    assert info.value.kind == "server" and info.value.retryable
    assert "overloaded" in info.value.message and SECRET not in info.value.message


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"text"', b'{"id": "x"}'])
async def test_a_chunk_of_the_wrong_shape_is_malformed(payload: bytes) -> None:
    with pytest.raises(ProviderError) as info:
        await _collect_from(b"data: " + payload + b"\n\n")
    assert info.value.kind == "malformed"


async def test_the_server_saying_do_not_retry_is_obeyed() -> None:
    refused = (503, {"x-should-retry": "false"}, b'{"error": {"message": "down"}}')
    with pytest.raises(ProviderError) as info:
        async with _serving(refused, _chunk("late", "stop")) as (provider, seen):
            await _answer(provider, "shape?")
    assert info.value.kind == "server" and "down" in info.value.message
    assert len(seen) == 1


async def test_a_non_json_error_body_still_names_the_status() -> None:
    with pytest.raises(ProviderError) as info:
        await _collect_from((502, {}, b"<html>Bad Gateway</html>"), (502, {}, b"<html>"))
    assert info.value.kind == "server" and "502" in info.value.message
    assert isinstance(info.value.__cause__, HTTPStatusError)
