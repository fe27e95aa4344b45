"""Security, point 9: readers that never read cannot make the gateway hold their answer.

Real processes: a `tokenrelay serve --workers 0` gateway and a `tokenrelay worker` write
one 10 MB answer (2,000 chunks of 5 KB). Then 100 SSE readers open its event stream
with a 4 KiB receive buffer and never read a byte; the gateway's RSS is sampled until it
settles. `GET /api/questions/{id}` on that answer is bounded too.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from tests.faults_report import record
from tests.support.procs import Cluster, Proc
from tokenrelay.gateway.answers import MAX_ANSWER_BYTES
from tokenrelay.keys import Keys

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

READERS = 100
BIG = 2000
BIG_CHUNK = 5000


def _stalled_reader(port: int, qid: str) -> socket.socket:
    """An SSE request whose client never reads: a 4 KiB receive buffer, full at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET /api/questions/{qid}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    return sock


async def _settled_rss(gateway: Proc, timeout_s: float = 30.0) -> int:
    """The gateway's RSS once it stops growing (three samples 0.5 s apart within 1%)."""
    samples = [gateway.rss_bytes()]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        samples.append(gateway.rss_bytes())
        last = samples[-3:]
        if len(last) == 3 and max(last) - min(last) < 0.01 * max(last):
            break
    return max(samples[-3:])


async def test_stalled_sse_readers_hold_bounded_memory(
    tmp_path: Path, redis_url: str, redis: Redis
) -> None:
    prefix = f"s{secrets.token_hex(4)}:"
    keys = Keys(prefix)
    big_text = " ".join(f"{n:05d}" + "x" * (BIG_CHUNK - 6) for n in range(BIG))
    (tmp_path / ".env").write_text(f"TOKENRELAY_SCRIPTED_TEXT={big_text}\n")
    async with Cluster(tmp_path, redis_url, prefix) as cluster:
        gateway = await cluster.gateway()
        await cluster.worker(TOKENRELAY_PROVIDER="scripted", TOKENRELAY_SCRIPTED_RATE="5000")
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
            qid = (await client.post("/api/questions", json={"question": "big"})).json()["id"]
            async with asyncio.timeout(60):
                while await redis.hget(keys.question(qid), "status") != "done":
                    await asyncio.sleep(0.2)
            # The record, bounded: the text up to the limit, and where the rest is.
            r = await client.get(f"/api/questions/{qid}")
            page = r.json()
            body_bytes = len(r.content)
            pages = 1
            after = page.get("next_after")
            while after:
                nxt = (await client.get(f"/api/questions/{qid}", params={"after": after})).json()
                page["answer"] += nxt["answer"]
                after = nxt.get("next_after")
                pages += 1
            baseline = await _settled_rss(gateway)
            readers = [_stalled_reader(gateway.port, qid) for _ in range(READERS)]
            try:
                loaded = await _settled_rss(gateway)
                healthy = (await client.get("/healthz")).json()
            finally:
                for sock in readers:
                    sock.close()
    per_reader_kib = (loaded - baseline) / READERS / 1024
    ok = per_reader_kib < 512 and body_bytes < 3 * MAX_ANSWER_BYTES
    record(
        "Security: readers that never read (memory per stalled SSE reader)",
        order=1209,
        load=f"{READERS} SSE readers of one {BIG * BIG_CHUNK / 1e6:g} MB answer "
        f"({BIG} chunks of {BIG_CHUNK / 1000:g} KB)",
        faults="each reader has a 4 KiB receive buffer and never reads",
        lost=None,
        doubled=None,
        result=(
            f"{'pass' if ok else 'FAIL'}: gateway RSS {baseline / 2**20:.0f} -> "
            f"{loaded / 2**20:.0f} MiB, {per_reader_kib:.0f} KiB per stalled reader "
            f"(before byte-bounded catch-up pages, same test at 4881750: 101 -> 372 MiB, "
            f"2,772 KiB each); "
            f"GET /api/questions/{{id}}: {body_bytes / 2**20:.1f} MiB per response "
            f"(was 20.7 MB), the whole text in {pages} pages via next_after"
        ),
        figures={
            "rss_baseline_mib": baseline / 2**20,
            "rss_loaded_mib": loaded / 2**20,
            "per_reader_kib": per_reader_kib,
            "get_body_bytes": body_bytes,
            "get_pages": pages,
        },
    )
    assert healthy["status"] == "ok"
    assert page["answer"] == big_text and pages > 1
    assert body_bytes < 3 * MAX_ANSWER_BYTES, body_bytes
    assert per_reader_kib < 512, (baseline, loaded)
