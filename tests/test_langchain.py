"""The `langchain` provider with real LangChain runnables (ChatOpenAI against the mock model
server over HTTP), through a real gateway."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable
from langchain_openai import ChatOpenAI

from tests.conftest import running_gateway
from tokenrelay import Client
from tokenrelay.client import AnswerFailed
from tokenrelay.providers.base import SYSTEM_PROMPT
from tokenrelay.settings import Settings
from tokenrelay.testing import MockLLM, answer_text, directive

SECRET = "lc-test-key-0123456789abcdef"  # not sk-shaped: found in the runnable itself
# The runnables below are built when the gateway starts, pointed at this module's mock.
mock_url = ""


def chat_model() -> ChatOpenAI:
    return ChatOpenAI(
        model="mock-llm", base_url=mock_url, api_key=SECRET, max_retries=0, stream_usage=True
    )


def seed_chain() -> Runnable[dict[str, str], str]:
    """The seed's chain: the system prompt about {topic}, the question, the model, a parser."""
    prompt = ChatPromptTemplate.from_messages([("system", SYSTEM_PROMPT), ("human", "{question}")])
    return prompt | chat_model() | StrOutputParser()


not_a_runnable = 42


@pytest.fixture(scope="module")
async def mock() -> AsyncIterator[MockLLM]:
    global mock_url
    async with MockLLM() as server:
        mock_url = server.base_url
        yield server


def langchain_settings(make: Callable[..., Settings], target: str) -> Settings:
    return make(provider="langchain", langchain_runnable=f"tests.test_langchain:{target}")


async def test_the_seed_chain_streams_through_the_gateway(
    make_settings: Callable[..., Settings], mock: MockLLM
) -> None:
    question = f"What is XADD? {directive(tokens=20, rate=200)}"
    async with (
        running_gateway(langchain_settings(make_settings, "seed_chain")) as url,
        Client(url) as client,
    ):
        events = [e async for e in await client.ask(question, topic="Redis Streams")]
        record, text = await client.question(events[0].question_id)
    chunks = [e.text for e in events if e.type == "chunk"]
    assert events[0].data["provider"] == "langchain" and events[0].data["model"] == "mock-llm"
    assert "".join(chunks) == text == answer_text(question) and len(chunks) > 10
    assert events[-1].type == "end" and record.status == "done"
    assert mock.requests_for("What is XADD?") == 1


async def test_a_chat_model_gets_the_prompt_and_reports_usage(
    make_settings: Callable[..., Settings], mock: MockLLM
) -> None:
    question = f"How many tokens? {directive(tokens=7)}"
    async with (
        running_gateway(langchain_settings(make_settings, "chat_model")) as url,
        Client(url) as client,
    ):
        answer = await client.ask(question, topic="Valkey", stream=False)
    assert answer.text == answer_text(question)
    assert answer.end.data["completion_tokens"] == 7
    # The mock counts the words of every message: the system prompt about the topic is there.
    system_words = len(SYSTEM_PROMPT.format(topic="Valkey").split())
    assert answer.end.data["prompt_tokens"] == system_words + len(question.split())
    assert answer.end.data["finish_reason"] == "stop"


async def test_model_failures_keep_their_kind_and_hide_the_key(
    make_settings: Callable[..., Settings], mock: MockLLM
) -> None:
    async with (
        running_gateway(langchain_settings(make_settings, "seed_chain")) as url,
        Client(url) as client,
    ):
        with pytest.raises(AnswerFailed) as refused:
            await client.ask(f"Key? {directive(fail=401)}", stream=False)
        with pytest.raises(AnswerFailed) as busy:
            await client.ask(f"Busy? {directive(fail=503)}", stream=False)
        fine = await client.ask("Still there?", stream=False)
    assert refused.value.kind == "auth" and "401" in str(refused.value)
    assert SECRET not in str(refused.value) and "***" in str(refused.value)
    assert busy.value.kind == "server"
    assert fine.text == answer_text("Still there?")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("tests.no_such_module:chain", "cannot load 'tests.no_such_module:chain'"),
        ("tests.test_langchain:missing", "has no attribute 'missing'"),
        ("tests.test_langchain:not_a_runnable", "is a int, not a LangChain Runnable"),
        ("", "needs TOKENRELAY_LANGCHAIN_RUNNABLE=package.module:attr"),
    ],
)
async def test_a_bad_runnable_stops_start_up_with_one_line(target: str, message: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENRELAY_", "OPENAI_"))}
    env.update(
        REDIS_URL="redis://127.0.0.1:1/0",
        TOKENRELAY_PROVIDER="langchain",
        TOKENRELAY_LANGCHAIN_RUNNABLE=target,
    )
    if not target:
        del env["TOKENRELAY_LANGCHAIN_RUNNABLE"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenrelay", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert message in lines[0]
