"""Scenario 2: a worker SIGKILLed mid-generation; another reclaims its answers.

Real processes: `tokenrelay worker`s answering through the mock OpenAI-compatible server
(or the scripted provider, to force a different regeneration), a `tokenrelay serve`
gateway, the session's Valkey. No answer is ever left "streaming".
"""

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
from tests.support.procs import Cluster, Proc
from tests.support.streams import chunk_ids
from tokenrelay.keys import WORKER_GROUP, Keys
from tokenrelay.testing import answer_text, directive

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

IDLE_MS = 2000
ANSWERS = 3


async def _pending(redis: Redis, keys: Keys) -> list[dict[str, Any]]:
    rows: Any = await redis.xpending_range(keys.requests, WORKER_GROUP, "-", "+", 100)
    return list(rows)


async def _ask_all(url: str, questions: list[str]) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return [
            (await client.post("/api/questions", json={"question": q})).json()["id"]
            for q in questions
        ]


async def _records(url: str, qids: list[str]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return [(await client.get(f"/api/questions/{q}")).json()["question"] for q in qids]


async def _kill_when_streaming(viewers: list[Viewer], proc: Proc, chunks: int) -> float:
    async with asyncio.timeout(30):
        while min(len(v.chunks()) for v in viewers) < chunks:
            await asyncio.sleep(0.02)
    proc.kill()
    return time.time()


async def test_killed_worker_answers_reclaimed_and_continued(
    tmp_path: Path, redis_url: str, redis: Redis
) -> None:
    prefix = f"f{secrets.token_hex(4)}:"
    keys = Keys(prefix)
    async with Cluster(tmp_path, redis_url, prefix) as cluster:
        mock = await cluster.mock()
        cluster.settings.update(
            TOKENRELAY_PROVIDER="openai",
            OPENAI_BASE_URL=mock.url,
            OPENAI_MODEL="mock-llm",
            TOKENRELAY_RECLAIM_IDLE_MS=str(IDLE_MS),
        )
        gateway = await cluster.gateway()
        doomed = await cluster.worker("worker-1")
        questions = [f"W{n} {directive(tokens=60, rate=15)}" for n in range(ANSWERS)]
        qids = await _ask_all(gateway.url, questions)
        viewers = [Viewer([gateway.url], q, protocol=p) for q in qids for p in ("sse", "socketio")]
        tasks = [asyncio.create_task(v.run()) for v in viewers]
        await cluster.worker("worker-2")  # idle until worker-1 dies
        killed_at = await _kill_when_streaming(viewers, doomed, 15)
        reclaimed_at = None
        async with asyncio.timeout(30):
            while reclaimed_at is None:
                rows = await _pending(redis, keys)
                if rows and all(r["times_delivered"] >= 2 for r in rows):
                    reclaimed_at = time.time()
                await asyncio.sleep(0.05)
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)
        records = await _records(gateway.url, qids)
        truth = {q: await chunk_ids(redis, keys, q) for q in qids}
        pending_after = await _pending(redis, keys)

    counts = tally(viewers, truth)
    reclaim_s = reclaimed_at - killed_at
    # The longest silence a viewer saw: the reclaim wait plus regenerating the prefix.
    gaps = [
        max(b.at - a.at for a, b in zip(v.chunks(), v.chunks()[1:], strict=False)) for v in viewers
    ]
    seamless = all(
        "".join(g.text for g in v.chunks()) == answer_text(questions[qids.index(v.qid)])
        and "restart" not in [g.type for g in v.got]
        for v in viewers
    )
    ok = counts.lost == counts.doubled == 0 and seamless and not pending_after
    record(
        "Worker SIGKILLed mid-generation (mock OpenAI model)",
        order=200,
        load=f"{ANSWERS} answers of 60 chunks at 15/s, {len(viewers)} viewers (SSE + Socket.IO)",
        faults=f"SIGKILL the worker after 15 chunks; a second worker, reclaim idle {IDLE_MS} ms",
        lost=counts.lost,
        doubled=counts.doubled,
        result=(
            f"{'pass' if ok else 'FAIL'}: reclaimed {reclaim_s:.2f} s after the kill; "
            f"answers continued without a seam (no restart), longest silence "
            f"{max(gaps):.2f} s; all done, nothing left pending"
        ),
        figures={"reclaim_s": reclaim_s, "longest_gap_s": max(gaps), "idle_ms": IDLE_MS},
    )
    assert counts.lost == 0 and counts.doubled == 0 and counts.out_of_order == 0, counts
    assert seamless
    assert all(r["status"] == "done" for r in records)
    assert pending_after == []
    # XAUTOCLAIM runs every idle/3: reclaimed within idle + one pass (+ slack for a busy box).
    assert reclaim_s < IDLE_MS / 1000 * (1 + 1 / 3) + 1.5, reclaim_s


async def test_killed_worker_with_different_regeneration_restarts_or_fails(
    tmp_path: Path, redis_url: str, redis: Redis
) -> None:
    """A regeneration that differs writes `restart`; one that keeps dying ends `failed`."""
    prefix = f"f{secrets.token_hex(4)}:"
    keys = Keys(prefix)
    first_text = " ".join(f"alpha{n}" for n in range(40))
    second_text = " ".join(f"beta{n}" for n in range(40))
    async with Cluster(tmp_path, redis_url, prefix) as cluster:
        cluster.settings.update(
            TOKENRELAY_PROVIDER="scripted",
            TOKENRELAY_SCRIPTED_RATE="15",
            TOKENRELAY_RECLAIM_IDLE_MS=str(IDLE_MS),
            TOKENRELAY_MAX_DELIVERIES="2",
        )
        gateway = await cluster.gateway()
        # Restart: the second worker's model says something else.
        doomed = await cluster.worker("worker-alpha", TOKENRELAY_SCRIPTED_TEXT=first_text)
        (qid,) = await _ask_all(gateway.url, ["diverge"])
        viewers = [Viewer([gateway.url], qid, protocol=p) for p in ("sse", "socketio")]
        tasks = [asyncio.create_task(v.run()) for v in viewers]
        await _kill_when_streaming(viewers, doomed, 8)
        beta = await cluster.worker("worker-beta", TOKENRELAY_SCRIPTED_TEXT=second_text)
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)
        restart_truth = {qid: await chunk_ids(redis, keys, qid)}
        assert await asyncio.to_thread(beta.stop) == 0

        # Failed: every worker that takes it dies, until the delivery limit.
        text = " ".join(f"gamma{n}" for n in range(40))
        first = await cluster.worker("worker-g1", TOKENRELAY_SCRIPTED_TEXT=text)
        (doomed_qid,) = await _ask_all(gateway.url, ["doomed"])
        failing = [Viewer([gateway.url], doomed_qid)]
        failing_task = asyncio.create_task(failing[0].run())
        await _kill_when_streaming(failing, first, 5)
        second = await cluster.worker("worker-g2", TOKENRELAY_SCRIPTED_TEXT=text)
        async with asyncio.timeout(30):
            while sum(1 for g in failing[0].chunks()) < 8:
                await asyncio.sleep(0.02)
        second.kill()
        await cluster.worker("worker-g3", TOKENRELAY_SCRIPTED_TEXT=text)
        async with asyncio.timeout(60):
            await failing_task
        records = await _records(gateway.url, [qid, doomed_qid])

    for v in viewers:
        types = [g.type for g in v.got]
        after = v.got[types.index("restart") + 1 :] if "restart" in types else []
        assert "restart" in types, types
        assert "".join(g.text for g in after if g.type == "chunk") == second_text
        assert types[-1] == "end"
    restart_counts = tally(viewers, restart_truth)
    assert restart_counts.lost == 0 and restart_counts.doubled == 0
    last = failing[0].got[-1]
    assert last.type == "error" and "gave up after 3 attempts" in last.text, last
    assert [r["status"] for r in records] == ["done", "failed"]
    record(
        "Worker killed, regeneration differs / keeps dying",
        order=201,
        load="1 answer of 40 chunks, 2 viewers; then 1 answer, 1 viewer",
        faults="SIGKILL the worker; the next worker's model answers differently; "
        "then two workers SIGKILLed in turn (delivery limit 2)",
        lost=restart_counts.lost,
        doubled=restart_counts.doubled,
        result="pass: a `restart` entry, then the new answer whole, ends `done`; "
        f"the twice-killed answer ends `failed`: {last.text!r}",
    )
