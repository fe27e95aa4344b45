"""The OpenAI front door, driven by the official `openai` SDK against a real gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk

from tests.conftest import running_gateway
from tests.support.proxy import CuttingProxy
from tokenrelay import Client
from tokenrelay.settings import Settings
from tokenrelay.testing import MockLLM, directive

TEXT = " ".join(f"tok{i}" for i in range(40))
KEY = "front-door-key-0123456789"


def sdk(url: str, key: str = "unused", **kw: Any) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{url}/v1", api_key=key, **kw)


def user(text: str) -> list[Any]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def entry_id(chunk: ChatCompletionChunk) -> str:
    return str((chunk.model_extra or {})["tokenrelay_entry_id"])


def content(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.fixture
async def gateway_url(make_settings: Callable[..., Settings]) -> AsyncIterator[str]:
    async with running_gateway(make_settings(scripted_text=TEXT, scripted_rate=100.0)) as url:
        yield url


async def test_sdk_streams_an_answer_with_its_id_and_usage(gateway_url: str) -> None:
    async with sdk(gateway_url) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="whatever", messages=user("Stream?"), stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        qid = raw.headers["x-tokenrelay-id"]
        chunks = [c async for c in raw.parse()]
    first, finish, usage = chunks[0], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.model == "scripted"
    assert content(chunks) == TEXT and {c.id for c in chunks} == {f"chatcmpl-{qid}"}
    assert finish.choices[0].finish_reason == "stop" and not usage.choices
    assert usage.usage is not None and usage.usage.completion_tokens == 40
    async with Client(gateway_url) as tokenrelay:
        record, text = await tokenrelay.question(qid)
    assert record.question == "Stream?" and record.topic == "General" and text == TEXT


async def test_a_cut_stream_re_attaches_without_asking_again(gateway_url: str) -> None:
    async with CuttingProxy(gateway_url) as proxy, sdk(proxy.url, max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=user("Cut?"), stream=True
        )
        qid = raw.headers["x-tokenrelay-id"]
        seen: list[ChatCompletionChunk] = []

        async def read_until_cut() -> None:
            async for chunk in raw.parse():
                seen.append(chunk)
                if len(seen) == 10:
                    proxy.cut()

        with pytest.raises(openai.APIConnectionError):
            await read_until_cut()
        headers = {"X-TokenRelay-Id": qid, "X-TokenRelay-After": entry_id(seen[-1])}
        stream = await client.chat.completions.create(
            model="m", messages=user("Cut?"), stream=True, extra_headers=headers
        )
        rest = [c async for c in stream]
    ids = [entry_id(c) for c in seen + rest if c.choices]
    assert len(ids) == len(set(ids)) and content(seen + rest) == TEXT
    async with httpx.AsyncClient(base_url=gateway_url) as http:
        questions = (await http.get("/api/questions")).json()["questions"]
        lines = []
        url = f"/v1/chat/completions/{qid}/stream?after={ids[20]}"
        async with http.stream("GET", url) as response:
            assert response.headers["x-tokenrelay-id"] == qid
            lines = [line async for line in response.aiter_lines() if line.startswith("data:")]
        future = f"{int(ids[-1].split('-')[0]) + 10**9}-0"
        late = await http.get(f"/v1/chat/completions/{qid}/stream", params={"after": future})
    assert late.status_code == 400 and "past this answer's last entry" in late.text
    assert [q["id"] for q in questions] == [qid]  # asked once
    assert lines[-1] == "data: [DONE]" and f'"tokenrelay_entry_id":"{ids[21]}"' in lines[0]


async def test_whole_completion_and_topics(gateway_url: str) -> None:
    async with sdk(gateway_url) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=user("Whole?"), extra_body={"topic": "Redis"}
        )
        completion = raw.parse()
        by_header = await client.chat.completions.with_raw_response.create(
            model="m", messages=user("Header?"), extra_headers={"X-TokenRelay-Topic": "Valkey"}
        )
    qid = raw.headers["x-tokenrelay-id"]
    assert completion.id == f"chatcmpl-{qid}" and completion.object == "chat.completion"
    assert completion.choices[0].message.content == TEXT
    assert completion.choices[0].finish_reason == "stop" and completion.model == "scripted"
    assert completion.usage is not None and completion.usage.completion_tokens == 40
    async with Client(gateway_url) as tokenrelay:
        assert (await tokenrelay.question(qid))[0].topic == "Redis"
        assert (await tokenrelay.question(by_header.headers["x-tokenrelay-id"]))[
            0
        ].topic == "Valkey"


async def test_failures_arrive_as_openai_errors_and_are_not_retried(
    make_settings: Callable[..., Settings],
) -> None:
    async with MockLLM() as mock:
        settings = make_settings(
            provider="openai", openai_base_url=mock.base_url, provider_max_retries=0
        )
        async with running_gateway(settings) as url, sdk(url, max_retries=2) as client:
            stream = await client.chat.completions.create(
                model="m", messages=user(f"Streamed? {directive(fail=401)}"), stream=True
            )
            with pytest.raises(openai.APIError, match="OPENAI_API_KEY"):
                async for _ in stream:
                    pass
            with pytest.raises(openai.APIStatusError) as whole:
                await client.chat.completions.create(
                    model="m", messages=user(f"Whole? {directive(fail=401)}")
                )
            with pytest.raises(openai.BadRequestError, match="needs a user message"):
                await client.chat.completions.create(
                    model="m", messages=[{"role": "system", "content": "no question"}]
                )
            with pytest.raises(openai.NotFoundError, match="no question with id"):
                await client.chat.completions.create(
                    model="m", messages=user("?"), extra_headers={"X-TokenRelay-Id": "B" * 22}
                )
    assert whole.value.status_code == 502 and "OPENAI_API_KEY" in whole.value.message
    assert whole.value.body == {
        "message": whole.value.body["message"],  # type: ignore[index]
        "type": "model_error",
        "param": None,
        "code": "auth",
    }
    assert mock.requests_for("Whole?") == 1  # x-should-retry: false kept the SDK from re-asking


async def test_api_keys_and_ownership(make_settings: Callable[..., Settings]) -> None:
    other = "another-key-0123456789abcdef"
    settings = make_settings(scripted_text=TEXT, api_keys=f"{KEY},{other}")
    async with running_gateway(settings) as url:
        async with sdk(url, key="wrong-key-0123456789") as stranger:
            with pytest.raises(openai.AuthenticationError, match="not valid"):
                await stranger.chat.completions.create(model="m", messages=user("Hi?"))
        async with sdk(url, key=KEY) as owner:
            raw = await owner.chat.completions.with_raw_response.create(
                model="m", messages=user("Mine?")
            )
        assert raw.parse().choices[0].message.content == TEXT
        async with sdk(url, key=other) as someone:
            with pytest.raises(openai.NotFoundError):
                await someone.chat.completions.create(
                    model="m",
                    messages=user("Mine?"),
                    extra_headers={"X-TokenRelay-Id": raw.headers["x-tokenrelay-id"]},
                )
