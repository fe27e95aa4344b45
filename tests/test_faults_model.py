"""Scenario 4: every model fault, against real processes, ends in a readable `error` entry.

A `tokenrelay worker` process talks to the mock OpenAI-compatible server (its own
process, on a fixed port so it can be stopped and started again); viewers watch over
SSE and Socket.IO through a `tokenrelay serve --workers 0` gateway. After each fault
the same worker process answers a normal question.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.faults_clients import Viewer, tally
from tests.faults_report import record
from tests.support.net import free_port
from tests.support.procs import Cluster, Proc
from tests.support.streams import chunk_ids
from tokenrelay.keys import Keys
from tokenrelay.testing import answer_text, directive

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

SECRET = "sk-fault-suite-never-shown-5a4b3c2d1e"

# (fault, directive, what the viewers must end with, a word the message must contain)
CASES: list[tuple[str, str, str, str]] = [
    ("401 Unauthorized", directive(fail=401), "auth", "OPENAI_API_KEY"),
    ("429, Retry-After 0, every try", directive(fail=429, retry_after=0), "rate_limit", "rate"),
    ("429, Retry-After 1 s, once", directive(fail=429, fail_times=1, retry_after=1), "end", ""),
    ("500, every try", directive(fail=500), "server", "failed"),
    ("500 before the first token, once", directive(fail=500, fail_times=1), "end", ""),
    ("503 before the first token, twice", directive(fail=503, fail_times=2), "end", ""),
    ("malformed chunk", directive(tokens=8, malformed_after=3), "malformed", "cannot read"),
    ("stream cut without its end", directive(tokens=8, cut_after=3), "incomplete", "cut short"),
    ("no first token within 4 s", directive(stall_first=8), "timeout", "first token"),
    ("stall mid-stream over 2 s", directive(tokens=8, stall_after=3, stall=8), "timeout", "stall"),
]


async def _ask(client: httpx.AsyncClient, question: str) -> str:
    r = await client.post("/api/questions", json={"question": question})
    assert r.status_code == 202, r.text
    qid: str = r.json()["id"]
    return qid


async def _watch(url: str, qid: str) -> list[Viewer]:
    viewers = [Viewer([url], qid, protocol=p, retry_for_s=5) for p in ("sse", "socketio")]
    async with asyncio.timeout(60):
        await asyncio.gather(*(v.run() for v in viewers))
    return viewers


async def _healthy_answer(client: httpx.AsyncClient, url: str, n: int) -> bool:
    question = f"and now a normal one #{n}"
    viewers = await _watch(url, await _ask(client, question))
    return all(
        v.got[-1].type == "end" and "".join(g.text for g in v.chunks()) == answer_text(question)
        for v in viewers
    )


async def _restart_mock(cluster: Cluster, port: int) -> Proc:
    return await cluster.mock("mock-again", port=port)


async def test_model_faults_end_in_readable_errors_and_the_worker_keeps_serving(
    tmp_path: Path, redis_url: str, redis: Redis
) -> None:
    prefix = f"f{secrets.token_hex(4)}:"
    keys = Keys(prefix)
    mock_port = free_port()
    rows: list[dict[str, Any]] = []
    async with Cluster(tmp_path, redis_url, prefix) as cluster:
        mock = await cluster.mock(port=mock_port)
        cluster.settings.update(
            TOKENRELAY_PROVIDER="openai",
            OPENAI_BASE_URL=mock.url,
            OPENAI_MODEL="mock-llm",
            OPENAI_API_KEY=SECRET,
            TOKENRELAY_PROVIDER_MAX_RETRIES="2",
            # Room for the SDK's retries (about 1.5 s) before the first token is overdue.
            TOKENRELAY_FIRST_TOKEN_TIMEOUT_S="4",
            TOKENRELAY_STALL_TIMEOUT_S="2",
        )
        gateway = await cluster.gateway()
        worker = await cluster.worker()
        client = httpx.AsyncClient(base_url=gateway.url, timeout=60)

        async def check(fault: str, qid: str, viewers: list[Viewer], want: str, hint: str) -> None:
            record_ = (await client.get(f"/api/questions/{qid}")).json()["question"]
            counts = tally(viewers, {qid: await chunk_ids(redis, keys, qid)})
            last = [v.got[-1] for v in viewers]
            told = all(g.type == ("end" if want == "end" else "error") for g in last)
            kind_ok = want == "end" or all(g.meta.get("kind") == want for g in last)
            readable = all(hint.lower() in g.text.lower() for g in last)
            secret_kept = all(SECRET not in g.text for g in last)
            serving = worker.alive and await _healthy_answer(client, gateway.url, len(rows))
            rows.append(
                {
                    "fault": fault,
                    "want": want,
                    "status": record_["status"],
                    "message": last[0].text,
                    "lost": counts.lost,
                    "doubled": counts.doubled,
                    "ok": told and kind_ok and readable and secret_kept and serving,
                    "elapsed_s": (last[0].at - viewers[0].connects[0][1]),
                }
            )

        for fault, question, want, hint in CASES:
            qid = await _ask(client, f"{fault}? {question}")
            await check(fault, qid, await _watch(gateway.url, qid), want, hint)

        # The model server is down: connection refused; then it comes back.
        mock.stop()
        qid = await _ask(client, "is anyone there?")
        viewers = await _watch(gateway.url, qid)
        mock = await _restart_mock(cluster, mock_port)
        await check("connection refused (model server down)", qid, viewers, "connection", "reach")

        # The model server dies mid-answer.
        qid = await _ask(client, f"dying? {directive(tokens=60, rate=10)}")
        viewers = [Viewer([gateway.url], qid, protocol=p) for p in ("sse", "socketio")]
        tasks = [asyncio.create_task(v.run()) for v in viewers]
        async with asyncio.timeout(30):
            while min(len(v.chunks()) for v in viewers) < 5:
                await asyncio.sleep(0.02)
        mock.kill()
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)
        await _restart_mock(cluster, mock_port)
        await check("model server SIGKILLed mid-answer", qid, viewers, "incomplete", "broke")
        await client.aclose()
        worker_log = worker.text() + gateway.text()

    for n, row in enumerate(rows):
        verdict = "pass" if row["ok"] else "FAIL"
        outcome = (
            "answer completed after retrying"
            if row["want"] == "end"
            else f"`error` ({row['want']}): {row['message'][:150]!r}"
        )
        record(
            f"Model fault: {row['fault']}",
            order=400 + n,
            load="1 answer, 2 viewers (SSE + Socket.IO)",
            faults=row["fault"],
            lost=row["lost"],
            doubled=row["doubled"],
            result=f"{verdict}: {outcome}; status {row['status']}; "
            f"viewers told in {row['elapsed_s']:.1f} s; the worker answered the next question",
        )
    failed = [r for r in rows if not r["ok"]]
    assert failed == [], failed
    assert all(r["lost"] == 0 and r["doubled"] == 0 for r in rows)
    assert all(r["status"] == ("done" if r["want"] == "end" else "failed") for r in rows)
    retried = {r["fault"]: r["elapsed_s"] for r in rows if r["want"] == "end"}
    assert retried["429, Retry-After 1 s, once"] >= 1.0  # Retry-After was honoured
    assert SECRET not in worker_log
