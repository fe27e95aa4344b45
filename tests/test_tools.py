"""Tool calls and reasoning through the front door, with the official openai SDK: the model's
`tool_calls` and `reasoning_content` are kept as typed entries and streamed back in OpenAI's
shape, resumable like the text; tools and tool results reach the model as sent."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
from openai import AsyncOpenAI

from tokenrelay.testing import MockLLM, directive
from tokenrelay.testing.mockllm import TOOL_ARGUMENTS

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a Redis command up",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]


async def _received(mock: MockLLM, marker: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        bodies: list[dict[str, Any]] = (await client.get(f"{mock.base_url}/mock/requests")).json()
    return next(b for b in bodies if marker in str(b["messages"][-1]["content"]))


async def test_tool_calls_and_reasoning_stream_back_and_resume(
    mock_gateway: tuple[str, MockLLM],
) -> None:
    url, mock = mock_gateway
    question = f"Which command? {directive(tool='lookup', reasoning=3)}"
    sdk = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    try:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="any",
            messages=[{"role": "user", "content": question}],
            tools=TOOLS,
            tool_choice="auto",
            stream=True,
        )
        qid = raw.headers["x-tokenrelay-id"]
        thoughts, name, arguments, finish, last_thought = "", "", "", None, ""
        async for chunk in raw.parse():
            delta = chunk.choices[0].delta
            thought = (delta.model_extra or {}).get("reasoning_content") or ""
            if thought:  # (thoughts queued behind a write may share an entry)
                last_thought = (chunk.model_extra or {})["tokenrelay_entry_id"]
            thoughts += thought
            for call in delta.tool_calls or []:
                name += call.function.name or "" if call.function else ""
                arguments += call.function.arguments or "" if call.function else ""
            finish = chunk.choices[0].finish_reason or finish
        whole = await sdk.chat.completions.create(
            model="any",
            messages=[{"role": "user", "content": question + " whole"}],
            tools=TOOLS,
        )
    finally:
        await sdk.close()
    body = await _received(mock, "Which command?")
    assert body["tools"] == TOOLS and body["tool_choice"] == "auto"
    assert thoughts == "thought0 thought1 thought2 "
    assert (name, arguments, finish) == ("lookup", TOOL_ARGUMENTS, "tool_calls")
    message = whole.choices[0].message
    assert message.tool_calls and message.tool_calls[0].function.name == "lookup"  # type: ignore[union-attr]
    assert message.tool_calls[0].function.arguments == TOOL_ARGUMENTS  # type: ignore[union-attr]
    assert (message.model_extra or {})["reasoning_content"] == thoughts
    assert whole.choices[0].finish_reason == "tool_calls"

    # Re-attach after the (last) thought: the tool call, each piece once.
    after = last_thought
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream("GET", f"{url}/v1/chat/completions/{qid}/stream?after={after}") as r,
    ):
        lines = [line async for line in r.aiter_lines() if line.startswith("data: {")]
    rest = [orjson.loads(line[6:]) for line in lines]
    deltas = [c["choices"][0]["delta"] for c in rest if c["choices"]]
    assert not [d for d in deltas if d.get("reasoning_content")]
    resumed = "".join(
        t["function"].get("arguments", "") for d in deltas for t in d.get("tool_calls", [])
    )
    assert resumed == TOOL_ARGUMENTS


async def test_a_tool_result_turn_reaches_the_model(mock_gateway: tuple[str, MockLLM]) -> None:
    url, mock = mock_gateway
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "lookup", "arguments": TOOL_ARGUMENTS},
    }
    messages: list[Any] = [
        {"role": "user", "content": "Which command reads a group?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "XREADGROUP GROUP g c ..."},
        {"role": "user", "content": f"So? {directive(tokens=5)}"},
    ]
    sdk = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    try:
        reply = await sdk.chat.completions.create(model="any", messages=messages, tools=TOOLS)
    finally:
        await sdk.close()
    body = await _received(mock, "So?")
    assert reply.choices[0].message.content
    assistant, tool = body["messages"][2], body["messages"][3]
    assert assistant["role"] == "assistant" and assistant["tool_calls"] == [call]
    assert tool == {
        "role": "tool",
        "content": "XREADGROUP GROUP g c ...",
        "tool_call_id": "call_1",
    }
