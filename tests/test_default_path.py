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
from pathlib import Path
from typing import Any

import pytest
import socketio

from tests.support.procs import Cluster, processes

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
    """`serve` as `make run` starts it; the seed page's `askQuestion` gets START, text, END."""
    async with Cluster(tmp_path, redis_url, "tokenrelay:") as cluster:
        cores = len(os.sched_getaffinity(0))
        serve = await cluster.serve(workers=cores, embedded=True, log_level="info")
        before = await processes(serve)
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
        after = await processes(serve)
        log = serve.text()
    assert errors == []
    assert received[0].startswith("START:") and received[0].endswith(";<br/>")
    question_id = received[0][len("START:") : -len(";<br/>")]
    assert received[-1] == f"<br/>;END:{question_id}"
    text = "".join(received[1:-1])
    assert len(text.split()) >= 3, text  # a real answer from the model, not an error line
    assert "provider local" in log  # `auto` chose the local model, in a worker process
    assert all(after[name]["restarts"] == 0 for name in after), after
    assert after["gateway"]["pid"] == before["gateway"]["pid"]
