"""Idempotent asks over real sockets: the same Idempotency-Key (HTTP, the front door) or
`request_id` (Socket.IO) from the same caller is answered once, however often it is sent;
the key reused for another question is a 409 / an error ack."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import socketio
from openai import AsyncOpenAI

from tokenrelay.testing import MockLLM, directive


async def test_http_retries_with_one_key_are_answered_once(
    mock_gateway: tuple[str, MockLLM],
) -> None:
    url, mock = mock_gateway
    question = f"Once over HTTP {directive(tokens=20, rate=50)}"
    headers = {"Idempotency-Key": "order-42"}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        first = await client.post("/api/questions", json={"question": question}, headers=headers)
        # A burst of retries at once (a client that timed out and retried in parallel).
        again = await asyncio.gather(
            *(
                client.post("/api/questions", json={"question": question}, headers=headers)
                for _ in range(10)
            )
        )
        whole = await client.post(
            "/api/questions", json={"question": question, "stream": False}, headers=headers
        )
        other = await client.post(
            "/api/questions", json={"question": "something else"}, headers=headers
        )
        unkeyed = await client.post("/api/questions", json={"question": question, "stream": False})
        bad = await client.post(
            "/api/questions", json={"question": question}, headers={"Idempotency-Key": "x" * 300}
        )
    qid = first.json()["id"]
    assert first.status_code == 202
    assert {r.json()["id"] for r in again} == {qid}
    assert whole.status_code == 200 and whole.json()["id"] == qid
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["error"]
    assert unkeyed.status_code == 200 and unkeyed.json()["id"] != qid  # no key: a new question
    assert bad.status_code == 422
    assert mock.requests_for("Once over HTTP") == 2  # the keyed question once, the unkeyed one


async def test_socketio_request_id_is_answered_once(mock_gateway: tuple[str, MockLLM]) -> None:
    url, mock = mock_gateway
    question = f"Once over Socket.IO {directive(tokens=10, rate=50)}"
    client = socketio.AsyncClient(reconnection=False)
    await client.connect(url, transports=["websocket"])
    try:
        acks: list[Any] = [
            await client.call("ask", {"question": question, "request_id": "r-1"}) for _ in range(3)
        ]
        seed: list[Any] = [
            await client.call(
                "askQuestion", {"topic": "t", "topicQuestion": question, "request_id": "r-2"}
            )
            for _ in range(2)
        ]
        conflict = await client.call("ask", {"question": "different", "request_id": "r-1"})
    finally:
        await client.disconnect()
        await client.wait()
    assert len({a["id"] for a in acks}) == 1
    assert len({a["id"] for a in seed}) == 1 and seed[0]["id"] != acks[0]["id"]
    assert "Idempotency-Key" in conflict["error"]
    # r-1 and r-2 differ in topic, so they are two questions: two model calls, not five.
    await asyncio.sleep(0.5)
    assert mock.requests_for("Once over Socket.IO") == 2


async def test_front_door_idempotency_key_is_answered_once(
    mock_gateway: tuple[str, MockLLM],
) -> None:
    url, mock = mock_gateway
    question = f"Once at the front door {directive(tokens=10, rate=50)}"
    sdk = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    ids = []
    try:
        for _ in range(3):
            raw = await sdk.chat.completions.with_raw_response.create(
                model="tokenrelay",
                messages=[{"role": "user", "content": question}],
                extra_headers={"Idempotency-Key": "sdk-7"},
            )
            ids.append(raw.headers["x-tokenrelay-id"])
            assert raw.parse().choices[0].message.content
    finally:
        await sdk.close()
    assert len(set(ids)) == 1
    assert mock.requests_for("Once at the front door") == 1
