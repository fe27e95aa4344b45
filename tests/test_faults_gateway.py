"""Scenario 1: a gateway SIGKILLed mid-answer; its 50 viewers move to a second gateway.

Real processes: two `tokenrelay serve --workers 0` gateways, one `tokenrelay worker`,
the mock model server, the session's Valkey. Half the viewers use SSE, half Socket.IO;
each resumes on the other gateway after the last entry it saw.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from tests.faults_clients import Viewer, percentile, tally
from tests.faults_report import record
from tests.support.procs import Cluster
from tests.support.streams import chunk_ids
from tokenrelay.keys import Keys
from tokenrelay.testing import answer_text, directive

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

ANSWERS = 5
VIEWERS = 50
TOKENS = 80


async def test_gateway_killed_mid_answer_viewers_resume_on_another(
    tmp_path: Path, redis_url: str, redis: Redis
) -> None:
    prefix = f"f{secrets.token_hex(4)}:"
    keys = Keys(prefix)
    async with Cluster(tmp_path, redis_url, prefix) as cluster:
        mock = await cluster.mock()
        model = {"OPENAI_BASE_URL": mock.url, "OPENAI_MODEL": "mock-llm"}
        await cluster.worker(TOKENRELAY_PROVIDER="openai", **model)
        first = await cluster.gateway("gateway-a")
        second = await cluster.gateway("gateway-b")
        questions = [f"Q{n} {directive(tokens=TOKENS, rate=20)}" for n in range(ANSWERS)]
        async with httpx.AsyncClient(base_url=first.url, timeout=30) as client:
            qids = [
                (await client.post("/api/questions", json={"question": q})).json()["id"]
                for q in questions
            ]
        viewers = [
            Viewer(
                [first.url, second.url],
                qids[n % ANSWERS],
                protocol="sse" if n % 2 == 0 else "socketio",
            )
            for n in range(VIEWERS)
        ]
        tasks = [asyncio.create_task(v.run()) for v in viewers]
        # Kill once every viewer is well into its answer.
        async with asyncio.timeout(30):
            while min(len(v.chunks()) for v in viewers) < 10:
                await asyncio.sleep(0.02)
        killed_at = time.time()
        first.kill()
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)
        truth = {qid: await chunk_ids(redis, keys, qid) for qid in qids}
        survivors = [p.name for p in cluster.procs if p.alive]

    counts = tally(viewers, truth)
    moved = [v for v in viewers if any(url == second.url for url, _ in v.connects)]
    # Reconnect time: from the kill to the first entry a viewer got from the second gateway.
    resumed_s = [
        min(g.at for g in v.got if g.at > killed_at) - killed_at
        for v in moved
        if any(g.at > killed_at for g in v.got)
    ]
    texts_ok = all(
        "".join(g.text for g in v.chunks()) == answer_text(questions[qids.index(v.qid)])
        for v in viewers
    )
    ok = (
        counts.lost == counts.doubled == counts.out_of_order == counts.unfinished == 0
        and len(moved) == VIEWERS
        and texts_ok
    )
    record(
        "Gateway SIGKILLed mid-answer",
        order=100,
        load=f"{VIEWERS} viewers (25 SSE, 25 Socket.IO) on {ANSWERS} answers of {TOKENS} chunks",
        faults="SIGKILL gateway A after 10+ chunks; viewers reconnect to gateway B",
        lost=counts.lost,
        doubled=counts.doubled,
        result=(
            f"{'pass' if ok else 'FAIL'}: all {VIEWERS} viewers finished on gateway B; "
            f"resumed within p50 {percentile(resumed_s, 0.5):.2f} s, "
            f"max {max(resumed_s, default=float('nan')):.2f} s of the kill"
        ),
        figures={
            "chunks_expected": counts.chunks_expected,
            "chunks_received": counts.chunks_received,
            "resume_p50_s": percentile(resumed_s, 0.5),
            "resume_max_s": max(resumed_s, default=None),
        },
    )
    assert counts.lost == 0 and counts.doubled == 0 and counts.out_of_order == 0, counts
    assert counts.unfinished == 0
    assert len(moved) == VIEWERS  # every viewer really lost its gateway and moved
    assert texts_ok
    assert all(v.got[-1].type == "end" for v in viewers)
    assert "gateway-b" in survivors and "worker" in survivors
