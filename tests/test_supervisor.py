"""`tokenrelay serve` as a supervisor, against real processes: a worker process that crashes,
is stopped, or gets stuck is replaced and its answers go on; a stopped or killed `serve`
loses no answer and leaves no process behind; the embedded Valkey is a child that is
restarted from its AOF.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from redis.asyncio import Redis

from tests.faults_clients import Viewer, tally
from tests.faults_report import record
from tests.stuck_model import WORDS
from tests.support.procs import Cluster, processes, wait_http, wait_processes
from tests.support.streams import chunk_ids
from tokenrelay.keys import WORKER_GROUP, Keys
from tokenrelay.testing import answer_text, directive

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[1]


async def _ask(url: str, questions: list[str]) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return [
            (await client.post("/api/questions", json={"question": q})).json()["id"]
            for q in questions
        ]


async def _question(url: str, qid: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        body: dict[str, Any] = (await client.get(f"/api/questions/{qid}")).json()
        return body


async def _until(viewers: list[Viewer], chunks: int, timeout_s: float = 30) -> None:
    async with asyncio.timeout(timeout_s):
        while min(len(v.chunks()) for v in viewers) < chunks:
            await asyncio.sleep(0.02)


async def _consumer_pending(redis: Redis, keys: Keys) -> dict[str, int]:
    rows: Any = await redis.xinfo_consumers(keys.requests, WORKER_GROUP)
    return {str(r["name"]): int(r["pending"]) for r in rows}


def _longest_gap_after(viewer: Viewer, at: float) -> float:
    """Seconds from `at` to the viewer's next chunk (how long the crash paused it)."""
    later = [g.at for g in viewer.chunks() if g.at > at]
    return (later[0] - at) if later else float("inf")


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL], ids=["SIGSEGV", "SIGKILL"])
async def test_crashed_worker_process_answers_go_on(
    tmp_path: Path, redis_url: str, redis: Redis, sig: signal.Signals
) -> None:
    """15 viewers (SSE + Socket.IO) on 5 answers; a worker process of `serve` crashes."""
    prefix = f"s{secrets.token_hex(4)}:"
    keys = Keys(prefix)
    async with Cluster(tmp_path, redis_url, prefix) as cluster:
        await cluster.answer_with_mock()
        serve = await cluster.serve(workers=2)
        before = await processes(serve)
        questions = [f"S{n} {directive(tokens=80, rate=20)}" for n in range(5)]
        qids = await _ask(serve.url, questions)
        viewers = [
            Viewer([serve.url], q, protocol=p) for q in qids for p in ("sse", "socketio", "sse")
        ]
        tasks = [asyncio.create_task(v.run()) for v in viewers]
        await _until(viewers, 10)
        owners = await _consumer_pending(redis, keys)
        busiest = max(owners, key=lambda name: owners[name])
        index = busiest.split("-w")[-1].split("-")[0]
        doomed = before[f"worker-{index}"]
        os.kill(int(doomed["pid"]), sig)
        crashed_at = time.time()
        after = await wait_processes(serve, 2, restarts=1)
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)
        truth = {q: await chunk_ids(redis, keys, q) for q in qids}
        records = [(await _question(serve.url, q))["question"] for q in qids]
        left = await redis.xpending(keys.requests, WORKER_GROUP)

    counts = tally(viewers, truth)
    moved = [v for v in viewers if any(g.at > crashed_at for g in v.chunks())]
    pauses = [_longest_gap_after(v, crashed_at) for v in moved]
    restarted = after[f"worker-{index}"]
    texts_whole = all(
        "".join(g.text for g in v.chunks()) == answer_text(questions[qids.index(v.qid)])
        for v in viewers
    )
    ok = counts.lost == counts.doubled == counts.unfinished == 0 and texts_whole
    record(
        f"A worker process of serve crashes ({sig.name})",
        order=250 + (sig == signal.SIGKILL),
        load="5 answers of 80 chunks at 20/s, 15 viewers (SSE + Socket.IO), 2 worker processes",
        faults=f"{sig.name} to the worker holding most answers after 10 chunks",
        lost=counts.lost,
        doubled=counts.doubled,
        result=(
            f"{'pass' if ok else 'FAIL'}: gateway pid unchanged, answers went on after at most "
            f"{max(pauses):.2f} s; replacement started ({restarted['last_exit']}); all done"
        ),
    )
    assert after["gateway"]["pid"] == before["gateway"]["pid"]  # viewers never lost it
    assert restarted["restarts"] == 1 and restarted["pid"] != doomed["pid"]
    assert restarted["last_exit"] == f"killed by {sig.name}"
    assert counts.lost == 0 and counts.doubled == 0 and counts.unfinished == 0, counts
    assert texts_whole  # the mock is deterministic: continued without a seam
    assert all(r["status"] == "done" for r in records)
    assert left["pending"] == 0
    assert max(pauses) < 2.0, pauses


async def test_sigterm_to_one_of_two_workers_hands_its_answer_to_the_other(
    tmp_path: Path, redis_url: str, redis: Redis
) -> None:
    """An answer longer than the grace period: the stopped worker lets go, the other ends it
    (a stop used to delete the consumer with its pending request: the answer hung)."""
    prefix = f"s{secrets.token_hex(4)}:"
    keys = Keys(prefix)
    async with Cluster(tmp_path, redis_url, prefix) as cluster:
        await cluster.answer_with_mock(
            TOKENRELAY_GRACE_PERIOD_S="1",
            TOKENRELAY_RECLAIM_IDLE_MS="60000",  # only a release can hand it over quickly
        )
        gateway = await cluster.gateway()
        first = await cluster.worker("worker-1")
        question = f"T {directive(tokens=60, rate=10)}"
        (qid,) = await _ask(gateway.url, [question])
        viewer = Viewer([gateway.url], qid)
        task = asyncio.create_task(viewer.run())
        await _until([viewer], 5)
        await cluster.worker("worker-2")
        stopped_at = time.time()
        code = await asyncio.to_thread(first.stop)
        async with asyncio.timeout(60):
            await task
        done_s = time.time() - stopped_at
        pending = await _consumer_pending(redis, keys)
        truth = {qid: await chunk_ids(redis, keys, qid)}
    counts = tally([viewer], truth)
    assert code == 0
    assert viewer.got[-1].type == "end"
    assert "".join(g.text for g in viewer.chunks()) == answer_text(question)
    assert counts.lost == counts.doubled == 0
    assert sum(pending.values()) == 0
    # Released on stop: the other worker's first reclaim pass (every 20 s here) took it.
    assert done_s < 30, done_s
    record(
        "SIGTERM to one of two workers mid-answer (answer longer than the grace period)",
        order=252,
        load="1 answer of 60 chunks at 10/s, 1 SSE viewer; grace period 1 s, reclaim idle 60 s",
        faults="SIGTERM the worker answering after 5 chunks",
        lost=counts.lost,
        doubled=counts.doubled,
        result=f"pass: released on stop, finished by the other worker {done_s:.1f} s later",
    )


async def test_serve_stopped_and_restarted_mid_answer_completes(
    tmp_path: Path, redis_url: str
) -> None:
    """The default layout (embedded Valkey in the data directory): SIGTERM `serve` while an
    answer streams, start it again; the viewer re-attaches and gets the answer whole."""
    async with Cluster(tmp_path, redis_url, "tokenrelay:") as cluster:
        await cluster.answer_with_mock(TOKENRELAY_GRACE_PERIOD_S="1")
        serve = await cluster.serve(workers=1, embedded=True)
        children = await processes(serve)
        question = f"R {directive(tokens=80, rate=10)}"
        (qid,) = await _ask(serve.url, [question])
        viewer = Viewer([serve.url], qid, retry_for_s=60)
        task = asyncio.create_task(viewer.run())
        await _until([viewer], 5)
        code = await asyncio.to_thread(serve.stop)
        await asyncio.sleep(0.5)
        leftovers = [p["name"] for p in children.values() if _alive(int(p["pid"]))]
        again = await cluster.serve("serve-2", workers=1, embedded=True, port=serve.port)
        async with asyncio.timeout(60):
            await task
        record_after = (await _question(again.url, qid))["question"]
    assert code == 0
    assert leftovers == []  # valkey, gateway and worker stopped with it
    assert viewer.got[-1].type == "end"
    assert "".join(g.text for g in viewer.chunks()) == answer_text(question)
    ids = [g.entry_id for g in viewer.chunks()]
    assert len(ids) == len(set(ids))
    assert record_after["status"] == "done"


async def test_stuck_worker_is_replaced_and_the_answer_goes_on(
    tmp_path: Path, redis_url: str, redis: Redis
) -> None:
    """A model call that blocks the worker's event loop (no cancellation can reach it): the
    heartbeat stops, `serve` kills and replaces the process, the answer continues."""
    prefix = f"s{secrets.token_hex(4)}:"
    flag = tmp_path / "stuck.flag"
    async with Cluster(tmp_path, redis_url, prefix) as cluster:
        cluster.settings.update(
            TOKENRELAY_PROVIDER="langchain",
            TOKENRELAY_LANGCHAIN_RUNNABLE="tests.stuck_model:runnable",
            TOKENRELAY_STALL_TIMEOUT_S="2",
            STUCK_MODEL_FLAG=str(flag),
            PYTHONPATH=str(REPO),
        )
        serve = await cluster.serve(workers=1)
        (qid,) = await _ask(serve.url, ["stuck?"])
        viewer = Viewer([serve.url], qid)
        task = asyncio.create_task(viewer.run())
        async with asyncio.timeout(60):
            await task
        after = await wait_processes(serve, 1, restarts=1)
        record_after = (await _question(serve.url, qid))["question"]
    assert flag.exists()  # it did get stuck
    assert after["worker-0"]["last_exit"].startswith("stuck: no heartbeat")
    assert viewer.got[-1].type == "end"
    assert "".join(g.text for g in viewer.chunks()) == "".join(WORDS)
    assert record_after["status"] == "done"
    record(
        "A worker process stuck in a blocking model call",
        order=253,
        load="1 answer, 1 SSE viewer; stall timeout 2 s",
        faults="the model blocks the worker's event loop after 5 chunks",
        lost=0,
        doubled=0,
        result="pass: no heartbeat for 7 s, the process was killed and replaced, the answer "
        "went on and ended whole",
    )


async def test_embedded_valkey_is_a_child_restarted_from_its_aof(
    tmp_path: Path, redis_url: str
) -> None:
    """Valkey dies under `serve`: restarted with its data; `serve` SIGKILLed: nothing stays."""
    async with Cluster(tmp_path, redis_url, "tokenrelay:") as cluster:
        cluster.settings.update(TOKENRELAY_PROVIDER="scripted", TOKENRELAY_SCRIPTED_RATE="200")
        serve = await cluster.serve(workers=1, embedded=True)
        (qid,) = await _ask(serve.url, ["before"])
        await Viewer([serve.url], qid).run()
        valkey_dir = tmp_path / "data" / "valkey"
        modes = {p.name: p.stat().st_mode & 0o777 for p in [valkey_dir, *valkey_dir.iterdir()]}
        children = await processes(serve)
        os.kill(int(children["valkey"]["pid"]), signal.SIGKILL)
        async with asyncio.timeout(30):
            while True:
                now = await processes(serve)
                if now["valkey"]["state"] == "running" and now["valkey"]["restarts"] == 1:
                    break
                await asyncio.sleep(0.1)
        await wait_http(serve, f"{serve.url}/healthz")
        kept = (await _question(serve.url, qid))["question"]["status"]
        (second,) = await _ask(serve.url, ["after"])
        after = await Viewer([serve.url], second).run()
        children = await processes(serve)
        serve.kill()
        await asyncio.sleep(2.0)
        orphans = [p["name"] for p in children.values() if _alive(int(p["pid"]))]
    assert kept == "done"  # the AOF kept the first answer's record
    assert after.got[-1].type == "end"
    assert orphans == []
    assert modes[valkey_dir.name] == 0o700
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
