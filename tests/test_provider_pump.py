"""OpenAIProvider.pump, the pushed read the worker uses: what `stream` gives, item for item
and error for error, from real servers (the mock model, and a raw one for shapes and gzip);
and what only pushing has: the consumer's own errors, `ready`, the deadlines of `pumped`."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator

import orjson
import pytest
from pydantic import SecretStr

from tests.support.rawhttp import Peer, RawServer
from tokenrelay import Client
from tokenrelay.client import AnswerFailed
from tokenrelay.errors import ProviderError
from tokenrelay.providers.base import Finish, Item, Prompt
from tokenrelay.providers.guard import Timeouts, guarded, pumped
from tokenrelay.providers.openai import OpenAIProvider
from tokenrelay.settings import Settings
from tokenrelay.testing import MockLLM, answer_pieces, directive

KEY = "sk-test-pump-0123456789abcdef"


@pytest.fixture(scope="module")
async def mock() -> AsyncIterator[MockLLM]:
    async with MockLLM() as server:
        yield server


def _provider(url: str, **overrides: object) -> OpenAIProvider:
    values: dict[str, object] = {
        "openai_api_key": SecretStr(KEY),
        "openai_base_url": url,
        "openai_model": "m",
        "provider_max_retries": 0,
        **overrides,
    }
    return OpenAIProvider.from_settings(Settings(_env_file=None, **values))  # type: ignore[arg-type]


async def _nothing() -> None:
    pass


async def _pulled(provider: OpenAIProvider, question: str) -> tuple[list[Item], object]:
    items: list[Item] = []
    try:
        async for item in provider.stream(Prompt("Redis", question)):
            items.append(item)
    except ProviderError as e:
        return items, (e.kind, e.message, e.retryable, type(e.__cause__))
    return items, None


async def _pushed(provider: OpenAIProvider, question: str) -> tuple[list[Item], object]:
    items: list[Item] = []
    try:
        await provider.pump(Prompt("Redis", question), items.append, _nothing)
    except ProviderError as e:
        return items, (e.kind, e.message, e.retryable, type(e.__cause__))
    return items, None


@pytest.mark.parametrize(
    "script",
    [
        directive(tokens=12),
        directive(tokens=30, rate=200),
        directive(tokens=3, reasoning=4),
        directive(tool="lookup"),
        directive(tokens=10, malformed_after=3),
        directive(tokens=10, cut_after=4),
        directive(fail=401),
        directive(fail=500),
    ],
)
async def test_pushed_items_and_errors_are_the_pulled_ones(mock: MockLLM, script: str) -> None:
    provider = _provider(mock.base_url)
    try:
        question = f"Same either way? {script}"
        pulled = await _pulled(provider, question)
        pushed = await _pushed(provider, question)
    finally:
        await provider.aclose()
    assert pushed == pulled
    assert pulled[0] or pulled[1]  # each script says something, or fails


def _chunk(content: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish}
    return b"data: " + orjson.dumps({"choices": [choice]}) + b"\n\n"


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
@pytest.mark.parametrize("piece", [1, 7, 10_000])
async def test_shapes_and_encodings_read_alike(encoding: str, piece: int) -> None:
    """Comments, CRLF, a usage chunk without choices, a compressed body (read in the task,
    not diverted), each in pieces of every size (the first piece with the head or not)."""
    usage = {"prompt_tokens": 7, "completion_tokens": 2}
    body = (
        b": ping\r\n\r\n"
        + _chunk("Hello").replace(b"\n", b"\r\n")
        + _chunk(" there", "stop")
        + b"data: "
        + orjson.dumps({"choices": None, "usage": usage})
        + b"\n\ndata: [DONE]\n\n"
    )
    headers = {} if encoding == "identity" else {"content-encoding": encoding}
    sent = body if encoding == "identity" else gzip.compress(body)

    async def handle(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.respond(sent, headers=headers, piece=piece)

    async with RawServer(handle) as server:
        provider = _provider(f"{server.url}/v1")
        try:
            pulled = await _pulled(provider, "shape?")
            pushed = await _pushed(provider, "shape?")
        finally:
            await provider.aclose()
    assert pulled == (["Hello", " there", Finish("stop", 7, 2)], None)
    assert pushed == pulled


async def test_what_the_consumer_raises_comes_out_untouched_and_hangs_up(
    mock: MockLLM,
) -> None:
    """A ValueError of the consumer's is not a 'malformed' chunk, and the server is left."""
    provider = _provider(mock.base_url)
    question = "Long? " + directive(tokens=1000, rate=100)
    seen: list[Item] = []

    def take(item: Item) -> None:
        seen.append(item)
        if len(seen) == 3:
            raise ValueError("the consumer's own")

    try:
        with pytest.raises(ValueError, match="the consumer's own"):
            await provider.pump(Prompt("Redis", question), take, _nothing)
        for _ in range(200):
            if not mock.active_streams:
                break
            await asyncio.sleep(0.01)
        assert mock.active_streams == 0
    finally:
        await provider.aclose()
    assert seen == answer_pieces(question)[:3]


async def test_ready_is_awaited_before_the_first_item(mock: MockLLM) -> None:
    provider = _provider(mock.base_url)
    question = "Ready? " + directive(tokens=5)
    order: list[str] = []

    async def ready() -> None:
        await asyncio.sleep(0.2)  # the first pieces arrive meanwhile, and wait
        order.append("ready")

    try:
        await provider.pump(
            Prompt("Redis", question), lambda i: order.append(type(i).__name__), ready
        )
    finally:
        await provider.aclose()
    assert order == ["ready", *["str"] * 5, "Finish"]


@pytest.mark.parametrize(
    ("script", "says"),
    [
        (directive(stall_first=5), "no first token within 0.4 s"),
        (directive(tokens=6, stall_after=2, stall=5), "stalled mid-answer, no token within 0.4 s"),
    ],
)
async def test_pumped_deadlines_say_what_guarded_says(
    mock: MockLLM, script: str, says: str
) -> None:
    timeouts = Timeouts(first_token_s=0.4, stall_s=0.4)
    provider = _provider(mock.base_url)
    question = f"Deadline? {script}"
    try:
        with pytest.raises(ProviderError) as pulled:
            async for _ in guarded(provider.stream(Prompt("Redis", question)), timeouts):
                pass
        with pytest.raises(ProviderError) as pushed:
            await pumped(
                provider.pump, Prompt("Redis", question), lambda _: None, _nothing, timeouts
            )
    finally:
        await provider.aclose()
    assert pushed.value.kind == pulled.value.kind == "timeout"
    assert pushed.value.message == pulled.value.message
    assert says in pushed.value.message


@pytest.mark.parametrize(
    ("script", "ready_s", "timed_out"),
    [
        # The first tokens come in time, while `ready` is awaited: no timeout.
        (directive(tokens=15, rate=10), 0.8, False),
        # The first token comes late, during a long `ready`: late all the same.
        (directive(tokens=3, stall_first=0.9), 0.7, True),
    ],
)
async def test_the_first_token_deadline_across_ready_is_guardeds(
    mock: MockLLM, script: str, ready_s: float, timed_out: bool
) -> None:
    """`guarded` counts the model's time to its first token, not what the caller does after
    it (the start entry's write): `pumped` awaits that work before the first item is taken,
    and must count the same."""
    timeouts = Timeouts(first_token_s=0.5, stall_s=0.5)
    provider = _provider(mock.base_url)
    items: list[Item] = []

    async def slow_ready() -> None:
        await asyncio.sleep(ready_s)

    prompt = Prompt("Redis", f"Ready late? {script}")
    try:
        if timed_out:
            with pytest.raises(ProviderError, match="no first token"):
                await pumped(provider.pump, prompt, items.append, slow_ready, timeouts)
            with pytest.raises(ProviderError, match="no first token"):
                async for _ in guarded(provider.stream(prompt), timeouts):
                    pass
        else:
            await pumped(provider.pump, prompt, items.append, slow_ready, timeouts)
            assert isinstance(items[-1], Finish)
    finally:
        await provider.aclose()


async def test_a_cancel_ends_a_pushed_answer_and_hangs_up_on_the_model(
    mock_gateway: tuple[str, MockLLM],
) -> None:
    """The cancel flag, learnt from a write, stops the pushed read between two chunks: the
    answer ends cancelled with the text so far, and the model's stream is closed."""
    url, mock = mock_gateway
    question = "Too long? " + directive(tokens=400, rate=40)
    async with Client(url) as client:
        stream = await client.ask(question)
        chunks = stream.chunks()
        assert await anext(chunks)
        assert await client.cancel(stream.id) is True
        with pytest.raises(AnswerFailed) as caught:
            async for _ in chunks:
                pass
        record, text = await client.question(stream.id)
    assert caught.value.kind == "cancelled"
    assert record.status == "cancelled"
    assert 0 < len(text) < len("".join(answer_pieces(question)))
    for _ in range(200):
        if not mock.active_streams:
            break
        await asyncio.sleep(0.01)
    assert mock.active_streams == 0
