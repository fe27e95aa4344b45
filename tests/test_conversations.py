"""Conversations over real sockets, checked at the model (the mock lists what it received):
the front door passes the caller's messages and sampling options through, and a question
asked in a thread brings the thread's earlier questions and answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
import socketio
from openai import AsyncOpenAI

from tests.conftest import running_gateway
from tokenrelay.providers.base import SYSTEM_PROMPT
from tokenrelay.settings import Settings
from tokenrelay.testing import MockLLM, directive


async def _received(mock: MockLLM, marker: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        bodies: list[dict[str, Any]] = (await client.get(f"{mock.base_url}/mock/requests")).json()
    (body,) = [b for b in bodies if marker in b["messages"][-1]["content"]]
    return body


async def test_front_door_passes_the_conversation_and_options_through(
    mock_gateway: tuple[str, MockLLM],
) -> None:
    url, mock = mock_gateway
    sdk = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages: list[Any] = [
        {"role": "system", "content": "You answer in exactly one sentence."},
        {"role": "user", "content": "What is a stream?"},
        {"role": "assistant", "content": "An append-only log of entries."},
        {"role": "user", "content": [{"type": "text", "text": f"And XACK? {directive()}"}]},
    ]
    try:
        reply = await sdk.chat.completions.create(
            model="any", messages=messages, temperature=0.3, max_tokens=50, seed=7, stop=["\n\n"]
        )
        with pytest.raises(openai.BadRequestError, match="unsupported parameter 'logprobs'"):
            await sdk.chat.completions.create(model="any", messages=messages, logprobs=True)
        with pytest.raises(openai.BadRequestError, match="'temperature' must be between"):
            await sdk.chat.completions.create(model="any", messages=messages, temperature=5)
        with pytest.raises(openai.BadRequestError, match="'role' must be one of"):
            await sdk.chat.completions.create(
                model="any",
                messages=[{"role": "wizard", "content": "?"}, *messages],  # type: ignore[list-item,misc]
            )
    finally:
        await sdk.close()
    body = await _received(mock, "And XACK?")
    assert reply.choices[0].message.content
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("system", "You answer in exactly one sentence."),  # theirs, not the seed's
        ("user", "What is a stream?"),
        ("assistant", "An append-only log of entries."),
        ("user", f"And XACK? {directive()}"),
    ]
    assert (body["temperature"], body["max_tokens"], body["seed"], body["stop"]) == (
        0.3,
        50,
        7,
        ["\n\n"],
    )


async def test_a_thread_gives_the_model_its_earlier_turns(
    mock_gateway: tuple[str, MockLLM],
) -> None:
    url, mock = mock_gateway
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def ask(question: str, follows: str | None = None) -> dict[str, Any]:
            body: dict[str, Any] = {"topic": "Redis", "question": question, "stream": False}
            if follows:
                body["follows"] = follows
            reply = await client.post("/api/questions", json=body)
            assert reply.status_code == 200, reply.text
            answer: dict[str, Any] = reply.json()
            return answer

        first = await ask(f"First {directive(tokens=8)}")
        second = await ask(f"Second {directive(tokens=8)}", follows=first["id"])
        third = await ask(f"Third {directive(tokens=8)}", follows=second["id"])
        streaming = await client.post(
            "/api/questions", json={"question": f"Slow {directive(tokens=50, rate=5)}"}
        )
        early = await client.post(
            "/api/questions", json={"question": "too soon", "follows": streaming.json()["id"]}
        )
        unknown = await client.post(
            "/api/questions", json={"question": "who?", "follows": "Z" * 22}
        )
        record = (await client.get(f"/api/questions/{third['id']}")).json()["question"]
    body = await _received(mock, "Third")
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("system", SYSTEM_PROMPT.format(topic="Redis")),
        ("user", f"First {directive(tokens=8)}"),
        ("assistant", first["output"]),
        ("user", f"Second {directive(tokens=8)}"),
        ("assistant", second["output"]),
        ("user", f"Third {directive(tokens=8)}"),
    ]
    assert record["follows"] == second["id"] and record["thread"] == first["id"]
    assert early.status_code == 422 and "follow up an answer that is done" in early.text
    assert unknown.status_code == 404


async def test_a_thread_is_trimmed_oldest_first(
    make_settings: Callable[..., Settings],
) -> None:
    async with MockLLM() as mock:
        settings = make_settings(
            provider="openai",
            openai_base_url=mock.base_url,
            openai_model="mock-llm",
            context_chars=150,
        )
        sio = socketio.AsyncClient(reconnection=False)
        async with running_gateway(settings) as url:
            await sio.connect(url, transports=["websocket"])
            previous = None
            for n in range(4):
                payload: dict[str, Any] = {
                    "question": f"Turn{n} {directive(text='x' * 40)}",
                    "stream": False,
                }
                if previous:
                    payload["follows"] = previous
                ack = await sio.call("ask", payload)
                assert "output" in ack, ack
                previous = ack["id"]
            await sio.disconnect()
            await sio.wait()
        body = await _received(mock, "Turn3")
    contents = [m["content"] for m in body["messages"]]
    assert contents[0] == SYSTEM_PROMPT.format(topic="Redis")  # kept
    assert not any("Turn0" in c for c in contents)  # the oldest turns went first
    assert any("Turn2" in c for c in contents)
    assert sum(len(c) for c in contents[1:-1]) <= 150
