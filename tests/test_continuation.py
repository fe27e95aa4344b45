"""True continuation: a worker SIGKILLed mid-answer under a model that samples (a new
generation would say something else) — the worker that takes over asks the model to
continue the cut-off answer, so the viewer reads one answer with no `restart`."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.faults_clients import Viewer, tally
from tests.faults_report import record
from tests.support.procs import Cluster
from tests.support.streams import chunk_ids
from tokenrelay.keys import Keys
from tokenrelay.providers.base import CONTINUE_INSTRUCTION
from tokenrelay.testing import directive

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]

TOKENS = 60


async def test_a_reclaimed_answer_continues_a_sampling_model(
    tmp_path: Path, redis_url: str, redis: Redis
) -> None:
    prefix = f"c{secrets.token_hex(4)}:"
    keys = Keys(prefix)
    async with Cluster(tmp_path, redis_url, prefix) as cluster:
        mock = await cluster.answer_with_mock(TOKENRELAY_RECLAIM_IDLE_MS="1000")
        gateway = await cluster.gateway()
        doomed = await cluster.worker("worker-1")
        question = f"Sampled {directive(tokens=TOKENS, rate=20, sample=1)}"
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            qid = (await client.post("/api/questions", json={"question": question})).json()["id"]
        viewers = [Viewer([gateway.url], qid, protocol=p) for p in ("sse", "socketio")]
        tasks = [asyncio.create_task(v.run()) for v in viewers]
        async with asyncio.timeout(30):
            while min(len(v.chunks()) for v in viewers) < 15:
                await asyncio.sleep(0.02)
        doomed.kill()
        killed_at = time.time()
        await cluster.worker("worker-2")
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)
        truth = {qid: await chunk_ids(redis, keys, qid)}
        async with httpx.AsyncClient(timeout=10) as client:
            received: Any = (await client.get(f"{mock.url}/mock/requests")).json()
    counts = tally(viewers, truth)
    continued = [b for b in received if b["messages"][-1]["content"] == CONTINUE_INSTRUCTION]
    texts = ["".join(g.text for g in v.chunks()) for v in viewers]
    before_kill = "".join(g.text for g in viewers[0].chunks() if g.at <= killed_at)
    assert all("restart" not in [g.type for g in v.got] for v in viewers)
    assert all(v.got[-1].type == "end" for v in viewers)
    assert texts[0] == texts[1]
    assert texts[0].startswith(before_kill) and len(texts[0]) > len(before_kill)
    # The model was asked to continue exactly what had been written, as its own turn.
    assert len(continued) == 1
    assert texts[0].startswith(continued[0]["messages"][-2]["content"])
    assert continued[0]["messages"][-2]["role"] == "assistant"
    assert len(texts[0].split()) == TOKENS  # the cut-off part and its continuation: whole
    assert counts.lost == counts.doubled == 0
    record(
        "Worker SIGKILLed under a sampling model: the answer is continued, not restarted",
        order=202,
        load=f"1 answer of {TOKENS} chunks at 20/s from a mock that samples, 2 viewers",
        faults="SIGKILL the worker after 15 chunks; a second worker takes over",
        lost=counts.lost,
        doubled=counts.doubled,
        result="pass: the model got the cut-off answer as its own turn and continued it; "
        "one answer, no restart entry",
    )
