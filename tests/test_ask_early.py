"""A model that pushes its items is asked while the answer is opened, not after: the
request reaches the model during the `open_answer` round trip, and an answer that turns
out to need nothing (cancelled meanwhile, its record gone) hangs up on the model and
writes nothing of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from tokenrelay.providers.guard import Timeouts
from tokenrelay.providers.openai import OpenAIProvider
from tokenrelay.services import make_store
from tokenrelay.settings import Settings
from tokenrelay.store import Store, answer_text
from tokenrelay.testing import MockLLM, answer_pieces, directive
from tokenrelay.wire import EntryType, QuestionRequest, Status
from tokenrelay.worker import Answer, ChunkWriter, Generator


@pytest.fixture
async def mock() -> AsyncIterator[MockLLM]:
    async with MockLLM() as server:
        yield server


@pytest.fixture
def store(make_settings: Callable[..., Settings], redis: Redis) -> Store:
    return make_store(make_settings(), redis)


@pytest.fixture
async def gen(store: Store, mock: MockLLM) -> AsyncIterator[Generator]:
    settings = Settings(
        _env_file=None,
        openai_api_key=SecretStr("sk-test-early-0123456789"),
        openai_base_url=mock.base_url,
        openai_model="m",
        provider_max_retries=0,
    )
    provider = OpenAIProvider.from_settings(settings)
    writer = ChunkWriter(store)
    writer.start()
    try:
        yield Generator(store, writer, provider, Timeouts(5, 5))
    finally:
        await writer.stop()
        await provider.aclose()


def _held_open(store: Store, mock: MockLLM, before: Callable[[], Any] | None = None) -> None:
    """`store.open_answer` goes to Redis only once the model has the request (at most 5 s:
    a worker that asks the model only after it fails the test), after `before`."""
    real = store.open_answer

    async def open_answer(question_id: str) -> Any:
        async with asyncio.timeout(5):
            while not mock.backend.received:
                await asyncio.sleep(0.005)
        if before is not None:
            await before()
        return await real(question_id)

    store.open_answer = open_answer  # type: ignore[method-assign]


async def test_the_model_is_asked_during_the_answers_open(
    store: Store, gen: Generator, mock: MockLLM
) -> None:
    question = "Early? " + directive(tokens=8)
    asked = await store.ask("Redis", question)
    _held_open(store, mock)
    request = QuestionRequest(asked.id, "Redis", question)
    status = await asyncio.wait_for(Answer(store, request, None).run(gen), 15)
    entries = await store.read_all(asked.id)
    assert status is Status.DONE
    assert entries[0].type is EntryType.START
    assert entries[-1].type is EntryType.END
    assert answer_text(entries) == "".join(answer_pieces(question))
    assert len(mock.backend.received) == 1


async def test_an_answer_cancelled_before_it_opened_hangs_up_on_the_model_asked_early(
    store: Store, gen: Generator, mock: MockLLM
) -> None:
    question = "Cancelled meanwhile? " + directive(tokens=400, rate=20)
    asked = await store.ask("Redis", question)

    async def cancel() -> None:
        await store.request_cancel(asked.id)

    _held_open(store, mock, cancel)
    request = QuestionRequest(asked.id, "Redis", question)
    status = await asyncio.wait_for(Answer(store, request, None).run(gen), 15)
    entries = await store.read_all(asked.id)
    assert status is Status.CANCELLED
    assert [e.type for e in entries] == [EntryType.CANCELLED]
    for _ in range(200):
        if not mock.active_streams:
            break
        await asyncio.sleep(0.01)
    assert mock.active_streams == 0


async def test_a_request_whose_record_is_gone_hangs_up_on_the_model_asked_early(
    store: Store, gen: Generator, mock: MockLLM, redis: Redis
) -> None:
    question = "Gone meanwhile? " + directive(tokens=400, rate=20)
    asked = await store.ask("Redis", question)

    async def forget() -> None:
        await redis.delete(store.keys.question(asked.id))

    _held_open(store, mock, forget)
    request = QuestionRequest(asked.id, "Redis", question)
    status = await asyncio.wait_for(Answer(store, request, None).run(gen), 15)
    assert status is Status.FAILED
    assert await store.read_all(asked.id) == []
    for _ in range(200):
        if not mock.active_streams:
            break
        await asyncio.sleep(0.01)
    assert mock.active_streams == 0
