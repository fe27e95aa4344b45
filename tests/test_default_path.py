"""The path a newcomer runs: `make run` is `tokenrelay serve` with nothing set — embedded
Valkey, worker processes, the local model — asked through the page's own protocol.

`make test` installs the local model first (scripts/install-local.sh, compiled once per
machine, then cached), so these run in every test run, CI included.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio

from tests.conftest import running_gateway
from tests.support.procs import Cluster, processes
from tests.support.sse import events
from tokenrelay.settings import Settings

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
PINNED = "0.3.36"  # scripts/install-local.sh and pyproject's `local` extra


def test_local_model_library_is_the_portable_pinned_build() -> None:
    """The compiled llama.cpp runs on every x86-64 machine of our kind: no AMX (GCC 12
    mis-compiles its kernels: a segfault on the first generation on Intel AMX machines),
    no AVX-512, nothing built for the compiling CPU only. Read from the library itself, so
    the check holds on whatever CPU this runs."""
    probe = (
        "import llama_cpp; print(llama_cpp.__version__); "
        "print(llama_cpp.llama_print_system_info().decode())"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, f"llama_cpp does not load (run `make test`):\n{done.stderr}"
    version, info = done.stdout.split("\n", 1)
    assert version.strip() == PINNED
    assert "AVX2 = 1" in info and "FMA = 1" in info, info  # the portable baseline is there
    enabled = set(re.findall(r"(\w+) = 1", info))
    assert not {f for f in enabled if f.startswith(("AMX", "AVX512", "AVX_VNNI"))}, info


async def test_serve_with_nothing_set_answers_the_page_with_the_local_model(
    tmp_path: Path, redis_url: str
) -> None:
    """`serve` as `make run` starts it: each worker loads the model before any question; the
    seed page's `askQuestion` gets START, text, END."""
    async with Cluster(tmp_path, redis_url, "tokenrelay:") as cluster:
        cores = len(os.sched_getaffinity(0))
        serve = await cluster.serve(workers=cores, embedded=True, log_level="info")
        before = await processes(serve)
        # Each worker loads the model at its start, not with its first question.
        async with asyncio.timeout(120):
            while serve.text().count("model SmolLM2-135M-Instruct.Q4_1 loaded in") < cores:
                await asyncio.sleep(0.1)
        received: list[str] = []
        errors: list[Any] = []
        ended = asyncio.Event()
        client = socketio.AsyncClient(reconnection=False)

        @client.on("chunk")  # type: ignore[untyped-decorator]
        async def chunk(data: Any) -> None:
            received.append(str(data))
            if str(data).startswith("<br/>;END:"):
                ended.set()

        @client.on("error")  # type: ignore[untyped-decorator]
        async def error(data: Any) -> None:
            errors.append(data)
            ended.set()

        await client.connect(serve.url, transports=["websocket"])
        try:
            await client.emit(
                "askQuestion", {"topic": "Redis", "topicQuestion": "What is a Redis stream?"}
            )
            async with asyncio.timeout(240):
                await ended.wait()
        finally:
            await client.disconnect()
        # uvicorn's own keep-alive is 5 s, the time httpx keeps an idle connection to reuse:
        # a request sent on it just then was reset. The gateway keeps it 75 s.
        kept = await _requests_on_one_connection(serve.url, idle_s=5.5)
        after = await processes(serve)
        log = serve.text()
    assert kept == ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"], kept
    assert errors == []
    assert received[0].startswith("START:") and received[0].endswith(";<br/>")
    question_id = received[0][len("START:") : -len(";<br/>")]
    assert received[-1] == f"<br/>;END:{question_id}"
    text = "".join(received[1:-1])
    assert len(text.split()) >= 3, text  # a real answer from the model, not an error line
    assert "provider local" in log  # `auto` chose the local model, in a worker process
    assert all(after[name]["restarts"] == 0 for name in after), after
    assert after["gateway"]["pid"] == before["gateway"]["pid"]


async def _requests_on_one_connection(url: str, idle_s: float) -> list[str]:
    """The status lines of two `GET /healthz` on one kept-alive connection, `idle_s` apart;
    what went wrong in place of the second when the gateway closed the connection."""
    host = url.removeprefix("http://").rstrip("/")
    address, _, port = host.rpartition(":")
    reader, writer = await asyncio.open_connection(address, int(port))
    statuses: list[str] = []
    try:
        for n in range(2):
            if n:
                await asyncio.sleep(idle_s)
            writer.write(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                statuses.append(f"closed after {idle_s} s idle: {e!r}")
                break
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            assert length is not None, head
            await reader.readexactly(int(length[1]))
            statuses.append(head.split(b"\r\n", 1)[0].decode())
    finally:
        writer.close()
    return statuses


async def test_a_cancel_reaches_an_answer_queued_for_the_local_model_and_keeps_accounts(
    make_settings: Callable[..., Settings],
) -> None:
    """The local model answers one question at a time: a cancel of the one waiting its turn
    ends it at once (not when its turn comes), and a cancelled answer records what it used."""
    settings = make_settings(
        provider="local", local_max_tokens=200, local_temperature=0.0, local_model_path=None
    )
    long = "Explain in detail how Redis Streams, consumer groups and XACK work together."
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        busy = (await client.post("/api/questions", json={"question": long})).json()["id"]
        queued = (await client.post("/api/questions", json={"question": "And XDEL?"})).json()
        seen: list[str] = []
        async for event in events(client, f"/api/questions/{queued['id']}/events"):
            seen.append(event.event)
            if event.event == "waiting":
                await client.post(f"/api/questions/{queued['id']}/cancel", json={})
        busy_then = (await client.get(f"/api/questions/{busy}")).json()["question"]["status"]
        async for event in events(client, f"/api/questions/{busy}/events"):
            if event.event == "chunk":
                await client.post(f"/api/questions/{busy}/cancel", json={})
                break
        async for event in events(client, f"/api/questions/{busy}/events"):
            last = event
        cancelled = (await client.get(f"/api/questions/{busy}")).json()
    assert seen[-1] == "cancelled" and "chunk" not in seen
    assert busy_then == "streaming"  # the waiting one ended before the running one
    assert last.event == "cancelled"
    assert cancelled["question"]["status"] == "cancelled"
    assert cancelled["question"]["completion_tokens"] > 0
    assert cancelled["answer"]  # the partial text stays readable
