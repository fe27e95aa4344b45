"""Every model failure ends the answer with a readable `error` entry; the worker keeps serving.

The whole path runs for real: gateway and worker over TCP, the OpenAI SDK talking SSE to an
OpenAI-compatible mock server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from tests.conftest import running_gateway
from tests.support.net import free_port
from tests.support.sse import Event, events
from tokenrelay.settings import Settings
from tokenrelay.testing import MockLLM, answer_text, directive

SECRET = "sk-test-never-shown-0123456789"


@pytest.fixture(scope="module")
async def mock() -> AsyncIterator[MockLLM]:
    async with MockLLM() as server:
        yield server


async def _ask(client: httpx.AsyncClient, question: str) -> tuple[list[Event], dict[str, object]]:
    qid = (await client.post("/api/questions", json={"question": question})).json()["id"]
    seen = [e async for e in events(client, f"/api/questions/{qid}/events")]
    record = (await client.get(f"/api/questions/{qid}")).json()["question"]
    return seen, record


CASES = [
    (directive(fail=401), "auth", "OPENAI_API_KEY"),
    (directive(fail=429, retry_after=0), "rate_limit", "rate"),
    (directive(fail=500), "server", "server"),
    (directive(fail=404), "bad_request", "mock-llm"),
    (directive(tokens=5, malformed_after=2), "malformed", ""),
    (directive(tokens=8, cut_after=3), "incomplete", ""),
    (directive(stall_first=5), "timeout", "first token"),
    (directive(tokens=6, stall_after=2, stall=5), "timeout", "stalled"),
]


@pytest.mark.parametrize(("question", "kind", "hint"), CASES)
async def test_model_failure_becomes_error_entry(
    make_settings: Callable[..., Settings], mock: MockLLM, question: str, kind: str, hint: str
) -> None:
    settings = make_settings(
        provider="openai",
        openai_base_url=mock.base_url,
        openai_api_key=SECRET,
        openai_model="mock-llm",
        provider_max_retries=0,
        first_token_timeout_s=0.7,
        stall_timeout_s=0.7,
    )
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        seen, record = await _ask(client, f"Why? {question}")
        last = seen[-1]
        assert last.event == "error", [e.event for e in seen]
        assert last.data["kind"] == kind
        assert hint.lower() in last.data["text"].lower()
        assert SECRET not in last.data["text"]
        assert record["status"] == "failed" and record["error"] == last.data["text"]
        # The same worker answers the next question.
        seen, record = await _ask(client, "And now?")
        assert seen[-1].event == "end" and record["status"] == "done"
        text = "".join(e.data["text"] for e in seen if e.event == "chunk")
        assert text == answer_text("And now?")


async def test_rate_limit_retried_before_first_token(
    make_settings: Callable[..., Settings], mock: MockLLM
) -> None:
    settings = make_settings(
        provider="openai", openai_base_url=mock.base_url, provider_max_retries=2
    )
    question = f"retry me {directive(fail=429, fail_times=1, retry_after=0)}"
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        seen, record = await _ask(client, question)
    assert seen[-1].event == "end" and record["status"] == "done"
    assert mock.requests_for("retry me") == 2


async def test_connection_refused_names_the_server(
    make_settings: Callable[..., Settings],
) -> None:
    base = f"http://127.0.0.1:{free_port()}/v1"
    settings = make_settings(provider="openai", openai_base_url=base, provider_max_retries=0)
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        seen, record = await _ask(client, "anyone there?")
        r = await client.post(
            "/askQuestionWithoutStream", json={"topic": "Redis", "topicQuestion": "hello?"}
        )
    assert seen[-1].data["kind"] == "connection"
    assert base.split("/v1")[0] in seen[-1].data["text"]
    assert record["status"] == "failed"
    assert r.status_code == 502 and base.split("/v1")[0] in r.json()["error"]
