"""OpenAIProvider against the mock model server over real HTTP: answers and every failure."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import pytest
from pydantic import SecretStr

from tokenrelay.errors import ConfigError, ProviderError
from tokenrelay.providers.base import Finish, Item, Prompt
from tokenrelay.providers.openai import OpenAIProvider
from tokenrelay.settings import Settings
from tokenrelay.testing import MockLLM, answer_pieces, answer_text, directive

KEY = "sk-test-tokenrelay-0123456789abcdef"
MODEL = "mock-model"

MakeProvider = Callable[..., OpenAIProvider]


@pytest.fixture(scope="module")
async def mock() -> AsyncIterator[MockLLM]:
    async with MockLLM() as server:
        yield server


@pytest.fixture
async def make_provider(mock: MockLLM) -> AsyncIterator[MakeProvider]:
    providers: list[OpenAIProvider] = []

    def make(**overrides: object) -> OpenAIProvider:
        values: dict[str, object] = {
            "openai_api_key": SecretStr(KEY),
            "openai_base_url": mock.base_url,
            "openai_model": MODEL,
            "provider_max_retries": 0,
            **overrides,
        }
        settings = Settings(_env_file=None, **values)  # type: ignore[arg-type]
        providers.append(OpenAIProvider.from_settings(settings))
        return providers[-1]

    yield make
    for provider in providers:
        await provider.aclose()


async def collect(
    provider: OpenAIProvider, question: str, into: list[Item] | None = None
) -> list[Item]:
    items = [] if into is None else into
    async for item in provider.stream(Prompt("Redis", question)):
        items.append(item)
    return items


async def expect_error(provider: OpenAIProvider, question: str, kind: str) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await collect(provider, question)
    error = info.value
    assert error.kind == kind, error.message
    assert KEY not in str(error)
    if kind != "incomplete":  # the rest come from the SDK, chained for the traceback
        assert error.__cause__ is not None
    return error


async def test_streams_the_answer_then_one_finish_with_usage(
    mock: MockLLM, make_provider: MakeProvider
) -> None:
    question = "What is a consumer group? " + directive(tokens=12)
    items = await collect(make_provider(), question)

    texts, finish = items[:-1], items[-1]
    assert all(isinstance(t, str) and t for t in texts)
    assert len(texts) == 12
    assert "".join(str(t) for t in texts) == answer_text(question)
    prompt = Prompt("Redis", question)
    words = len(prompt.system.split()) + len(question.split())
    assert finish == Finish("stop", prompt_tokens=words, completion_tokens=12)
    assert mock.requests_for("What is a consumer group?") == 1


async def test_no_key_with_a_base_url_uses_a_placeholder(make_provider: MakeProvider) -> None:
    provider = make_provider(openai_api_key=None)
    items = await collect(provider, "Keyless? " + directive(text="local ok"))
    assert items[:2] == ["local", " ok"]
    assert len(items) == 3
    assert isinstance(items[2], Finish)
    assert items[2].completion_tokens == 2


def test_no_key_and_no_base_url_is_a_config_error() -> None:
    settings = Settings(_env_file=None, openai_api_key=None, openai_base_url=None)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        OpenAIProvider.from_settings(settings)


async def test_connection_refused_names_the_base_url(make_provider: MakeProvider) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"  # nothing listens here any more
    error = await expect_error(make_provider(openai_base_url=url), "Anyone?", "connection")
    assert url in error.message
    assert "OPENAI_BASE_URL" in error.message
    assert error.retryable


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_key_says_check_the_key_and_never_repeats_it(
    make_provider: MakeProvider, status: int
) -> None:
    question = f"Who am I {status}? " + directive(fail=status)
    error = await expect_error(make_provider(), question, "auth")
    assert "OPENAI_API_KEY" in error.message
    assert str(status) in error.message
    assert not error.retryable
    if status == 401:  # the mock echoes the key whole, so the redaction was really needed
        assert KEY in str(error.__cause__)
        assert "***" in error.message


async def test_rate_limit_then_success_within_retries(
    mock: MockLLM, make_provider: MakeProvider
) -> None:
    question = "Busy at first? " + directive(tokens=4, fail=429, fail_times=2, retry_after=0.01)
    items = await collect(make_provider(provider_max_retries=2), question)
    assert "".join(str(t) for t in items[:-1]) == answer_text(question)
    assert isinstance(items[-1], Finish)
    assert mock.requests_for("Busy at first?") == 3


async def test_rate_limit_exhausting_retries(mock: MockLLM, make_provider: MakeProvider) -> None:
    question = "Always busy? " + directive(fail=429, retry_after=0.02)
    error = await expect_error(make_provider(provider_max_retries=1), question, "rate_limit")
    assert error.retryable
    assert error.retry_after_s == pytest.approx(0.02)
    assert "after 1 retries" in error.message
    assert mock.requests_for("Always busy?") == 2


@pytest.mark.parametrize("status", [500, 503])
async def test_server_error_is_retried_then_reported(
    mock: MockLLM, make_provider: MakeProvider, status: int
) -> None:
    question = f"Broken {status}? " + directive(fail=status, retry_after=0.01)
    error = await expect_error(make_provider(provider_max_retries=1), question, "server")
    assert error.retryable
    assert str(status) in error.message
    assert mock.requests_for(f"Broken {status}?") == 2


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_rejected_request_names_the_model(
    mock: MockLLM, make_provider: MakeProvider, status: int
) -> None:
    question = f"Unknown model {status}? " + directive(fail=status)
    error = await expect_error(make_provider(provider_max_retries=2), question, "bad_request")
    assert repr(MODEL) in error.message
    assert "OPENAI_MODEL" in error.message
    assert not error.retryable
    assert mock.requests_for(f"Unknown model {status}?") == 1  # never retried


async def test_malformed_chunk_after_some_text(make_provider: MakeProvider) -> None:
    question = "Garbled? " + directive(tokens=10, malformed_after=3)
    provider = make_provider()
    seen: list[Item] = []
    with pytest.raises(ProviderError) as info:
        await collect(provider, question, into=seen)
    assert info.value.kind == "malformed"
    assert "JSONDecodeError" in info.value.message
    assert seen == answer_pieces(question)[:3]


async def test_stream_cut_short_is_incomplete(make_provider: MakeProvider) -> None:
    question = "Cut? " + directive(tokens=10, cut_after=4)
    error = await expect_error(make_provider(), question, "incomplete")
    assert "cut short" in error.message


async def test_silent_server_times_out(make_provider: MakeProvider) -> None:
    provider = make_provider(first_token_timeout_s=0.3, stall_timeout_s=0.3)
    error = await expect_error(provider, "Slow? " + directive(stall_first=5), "timeout")
    assert error.retryable


@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_leaving_early_closes_the_response(how: str) -> None:
    async with MockLLM() as server:
        settings = Settings(
            _env_file=None, openai_api_key=SecretStr(KEY), openai_base_url=server.base_url
        )
        provider = OpenAIProvider.from_settings(settings)
        question = "Long? " + directive(tokens=1000, rate=50)
        stream = provider.stream(Prompt("Redis", question))
        assert isinstance(stream, AsyncGenerator)
        try:
            if how == "aclose":
                assert isinstance(await anext(stream), str)
                assert server.active_streams == 1
                await stream.aclose()
            else:
                started = asyncio.Event()

                async def consume() -> None:
                    async for _ in stream:
                        started.set()

                task = asyncio.create_task(consume())
                await started.wait()
                assert server.active_streams == 1
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            # Without the hang-up the server would stream for another 20 s.
            for _ in range(200):
                if not server.active_streams:
                    break
                await asyncio.sleep(0.01)
            assert server.active_streams == 0
        finally:
            await provider.aclose()
