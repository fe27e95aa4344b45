"""One writer per answer: a worker paused (SIGSTOP) long enough to be reclaimed cannot write
to the answer once another worker has taken it over, even after it wakes (SIGCONT)."""

from __future__ import annotations

import asyncio
import secrets
import signal
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
from tokenrelay.testing import answer_text, directive

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]


async def test_a_paused_then_reclaimed_worker_cannot_write(
    tmp_path: Path, redis_url: str, redis: Redis
) -> None:
    prefix = f"x{secrets.token_hex(4)}:"
    keys = Keys(prefix)
    async with Cluster(tmp_path, redis_url, prefix) as cluster:
        await cluster.answer_with_mock(TOKENRELAY_RECLAIM_IDLE_MS="1000")
        gateway = await cluster.gateway()
        paused = await cluster.worker("worker-1")
        question = f"F {directive(tokens=60, rate=15)}"
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            reply = await client.post("/api/questions", json={"question": question})
            qid = reply.json()["id"]
        viewer = Viewer([gateway.url], qid)
        task = asyncio.create_task(viewer.run())
        async with asyncio.timeout(30):
            while len(viewer.chunks()) < 10:
                await asyncio.sleep(0.02)
        paused.popen.send_signal(signal.SIGSTOP)
        await cluster.worker("worker-2")
        async with asyncio.timeout(30):  # the second worker took over and is writing
            while len(viewer.chunks()) < 25:
                await asyncio.sleep(0.02)
        paused.popen.send_signal(signal.SIGCONT)
        async with asyncio.timeout(60):
            await task
        await asyncio.sleep(1.0)  # what the woken worker would have written, it has by now
        stream: Any = await redis.xrange(keys.answer(qid))
        truth = {qid: await chunk_ids(redis, keys, qid)}
        log = paused.text()
    types = [fields["type"] for _, fields in stream]
    counts = tally([viewer], truth)
    text = "".join(g.text for g in viewer.chunks())
    assert text == answer_text(question)  # nothing from the paused worker slipped in
    assert types.count("start") == 1
    assert sum(types.count(t) for t in ("end", "error", "cancelled")) == 1
    assert types[-1] == "end"
    assert counts.lost == counts.doubled == 0
    assert "another worker took over" in log
    record(
        "A worker paused (SIGSTOP) past the reclaim time, then woken (SIGCONT)",
        order=260,
        load="1 answer of 60 chunks at 15/s, 1 SSE viewer, 2 worker processes",
        faults="SIGSTOP the answering worker after 10 chunks; SIGCONT it once the other "
        "has written 15 more",
        lost=counts.lost,
        doubled=counts.doubled,
        result="pass: the woken worker's writes were refused inside Redis (epoch fence); one "
        "start, one end, the text whole",
    )
