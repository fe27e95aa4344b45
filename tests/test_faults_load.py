"""Scenario 6: 1,000 concurrent viewers on 100 concurrent answers, one gateway.

Real processes: a `tokenrelay serve --workers 0` gateway, a `tokenrelay worker`, the mock
model. Half the viewers use SSE, half Socket.IO. Every viewer must end with its whole
answer, nothing lost or doubled, and each process's Redis connections stay constant.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from redis.asyncio import Redis

from tests.faults_clients import Viewer, collector_paused, percentile, tally
from tests.faults_report import record
from tests.support.procs import Cluster, Proc
from tests.support.streams import chunk_ids
from tokenrelay.keys import Keys
from tokenrelay.testing import answer_text, directive

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

VIEWERS = 1000
# Each process: its pool (TOKENRELAY_REDIS_POOL_SIZE, default 8), one blocking reader and
# the store's batching connection; a worker process one more, its writer's own
# (connection.Lane each).
CONNECTIONS = {"gateway": 8 + 1 + 1, "worker": 8 + 1 + 1 + 1}
ANSWERS = 100
TOKENS = 60


def _connections(proc: Proc, port: int) -> int:
    conns = psutil.Process(proc.pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.raddr and c.raddr.port == port and c.status == "ESTABLISHED")


async def test_thousand_viewers_on_hundred_answers(
    tmp_path: Path, redis_url: str, redis: Redis
) -> None:
    prefix = f"f{secrets.token_hex(4)}:"
    keys = Keys(prefix)
    redis_port = int(urlsplit(redis_url).port or 6379)
    async with Cluster(tmp_path, redis_url, prefix) as cluster:
        mock = await cluster.mock()
        cluster.settings.update(
            TOKENRELAY_PROVIDER="openai",
            OPENAI_BASE_URL=mock.url,
            OPENAI_MODEL="mock-llm",
            TOKENRELAY_WORKER_CONCURRENCY=str(ANSWERS + 28),
        )
        gateway = await cluster.gateway()
        questions = [f"L{n} {directive(tokens=TOKENS, rate=10)}" for n in range(ANSWERS)]
        limits = httpx.Limits(max_connections=ANSWERS)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60, limits=limits) as client:
            asked = await asyncio.gather(
                *(client.post("/api/questions", json={"question": q}) for q in questions)
            )
        qids = [r.json()["id"] for r in asked]
        viewers = [
            Viewer([gateway.url], qids[n % ANSWERS], protocol="sse" if n % 2 else "socketio")
            for n in range(VIEWERS)
        ]
        # All 1,000 attach to the 100 queued answers; then a worker answers them all at once.
        tasks = [asyncio.create_task(v.run()) for v in viewers]
        async with asyncio.timeout(60):
            await asyncio.gather(*(v.attached.wait() for v in viewers))
        worker = await cluster.worker()
        procs = (gateway, worker)
        cpu_before = {p.name: psutil.Process(p.pid).cpu_times() for p in procs}
        started = time.monotonic()
        busy: dict[str, list[int]] = {p.name: [] for p in procs}
        with collector_paused():  # this process times the chunks: no pause of its own
            while not all(t.done() for t in tasks):
                for p in procs:
                    busy[p.name].append(_connections(p, redis_port))
                await asyncio.sleep(0.25)
                assert time.monotonic() - started < 120, "viewers did not finish in 120 s"
            await asyncio.gather(*tasks)
        elapsed_s = time.monotonic() - started
        cpu_s = {
            p.name: sum(psutil.Process(p.pid).cpu_times()[:2]) - sum(cpu_before[p.name][:2])
            for p in procs
        }
        truth = {q: await chunk_ids(redis, keys, q) for q in qids}
        alive = all(p.alive for p in cluster.procs)

    counts = tally(viewers, truth)
    texts_ok = all(
        "".join(g.text for g in v.chunks()) == answer_text(questions[qids.index(v.qid)])
        for v in viewers
    )
    latencies = [g.latency_ms for v in viewers for g in v.chunks()]
    constant = all(set(seen) == {CONNECTIONS[name]} for name, seen in busy.items())
    delivered = sum(len(v.got) for v in viewers)
    ok = counts.lost == counts.doubled == counts.unfinished == 0 and texts_ok and constant
    record(
        "1,000 viewers on 100 answers, one gateway",
        order=600,
        load=f"{VIEWERS} viewers (500 SSE, 500 Socket.IO) on {ANSWERS} concurrent answers "
        f"of {TOKENS} chunks at 10/s",
        faults="none (load)",
        lost=counts.lost,
        doubled=counts.doubled,
        result=(
            f"{'pass' if ok else 'FAIL'}: all {VIEWERS} finished in {elapsed_s:.1f} s; "
            f"{delivered} events; latency p50 {percentile(latencies, 0.5):.0f} ms, "
            f"p95 {percentile(latencies, 0.95):.0f} ms; Redis "
            f"connections per process {'constant at ' + str(CONNECTIONS) if constant else busy}; "
            f"CPU gateway "
            f"{cpu_s['gateway']:.1f} s, worker {cpu_s['worker']:.1f} s"
        ),
        figures={
            "elapsed_s": elapsed_s,
            "events": delivered,
            "latency_p50_ms": percentile(latencies, 0.5),
            "latency_p95_ms": percentile(latencies, 0.95),
            "latency_p99_ms": percentile(latencies, 0.99),
            "redis_connections_under_load": {k: sorted(set(v)) for k, v in busy.items()},
            "cpu_s": cpu_s,
        },
    )
    assert counts.lost == 0 and counts.doubled == 0 and counts.out_of_order == 0, counts
    assert counts.unfinished == 0 and texts_ok
    assert constant, {k: sorted(set(v)) for k, v in busy.items()}
    assert alive
