"""The system under test, as real processes started by the tests' harness
(tests/support/procs.py): the mock model, Valkey and tokenrelay in one of two layouts.

- `split`: `tokenrelay gateway` and `tokenrelay worker`, one process each, on a Valkey
  the benchmark starts (with the persistence `serve` gives its own);
- `serve`: what `make run` starts, `tokenrelay serve` with nothing but the model set: the
  supervisor, its embedded Valkey, one gateway process and one worker process per core;
- `cluster`: the split layout in cluster mode (`TOKENRELAY_REDIS_CLUSTER=true`, `REDIS_URL`
  one node) on a Valkey Cluster on loopback (3 masters + 1 replica each), each node's CPU
  tracked on its own ("valkey:m1".., "valkey:r1"..).

CPU is read per process with psutil. Under `serve` the children are found by their command
line and summed by role (all workers together), so "worker" means every worker process;
a child that exits keeps the CPU it was last seen with.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import psutil
from redis.asyncio import Redis, RedisCluster

from bench import ROOT
from bench.valkey_cluster import ValkeyCluster
from tests.support.procs import Cluster, processes, valkey
from tokenrelay.embedded import EmbeddedValkey
from tokenrelay.keys import Keys
from tokenrelay.settings import CLUSTER_SHARDS

Layout = Literal["split", "serve", "cluster"]
LAYOUTS: tuple[Layout, ...] = ("split", "serve", "cluster")
UVLOOP_WORKER = (
    "import sys, uvloop; uvloop.install(); from tokenrelay.cli import main; "
    "sys.exit(main(['--log-level', 'warning', 'worker']))"
)
ROLES = ("gateway", "worker", "valkey", "mock", "serve")


@dataclass(frozen=True, slots=True)
class StackConfig:
    worker_concurrency: int
    retention_s: int
    appendonly: bool = True
    # What-if: the worker on uvloop (as the gateway is), not `tokenrelay worker` as shipped.
    worker_uvloop: bool = False
    layout: Layout = "split"
    # Worker processes under `serve`; None: its default (one per core), as `make run` runs.
    serve_workers: int | None = None
    # The `cluster` layout's Valkey Cluster.
    cluster_masters: int = 3
    cluster_replicas: int = 1


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
        self.worker_processes = 1
        self.cluster = Cluster(workdir, prefix=self.keys.prefix)
        # pid -> (role, process, last (user, system) seen): a child that exits keeps its CPU.
        self._tracked: dict[int, tuple[str, psutil.Process, tuple[float, float]]] = {}
        self._serve: psutil.Process | None = None
        self._valkey: Any = None
        self._valkey_cluster: ValkeyCluster | None = None
        self._cluster_client: RedisCluster | None = None
        # One client per cluster node, for CLIENT LIST; a node label ("m1", "r1") each.
        self._nodes: dict[str, Redis] = {}
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
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        mock = await self.cluster.mock(module="bench.mock", PYTHONPATH=str(ROOT))
        self._track("mock", mock.pid)
        self.mock_url = mock.url.removesuffix("/v1")
        self.cluster.settings.update(
            TOKENRELAY_PROVIDER="openai",
            OPENAI_BASE_URL=mock.url,
            OPENAI_MODEL="mock-llm",
            TOKENRELAY_RETENTION_S=str(self.config.retention_s),
            TOKENRELAY_WORKER_CONCURRENCY=str(self.config.worker_concurrency),
            # Every simulated user asks from 127.0.0.1: one caller, as many answers as a run.
            TOKENRELAY_MAX_QUEUED_PER_CALLER=str(self.config.worker_concurrency),
        )
        if self.config.layout == "serve":
            await self._start_serve()
        elif self.config.layout == "cluster":
            await self._start_cluster()
        else:
            await self._start_split()
        # Under `cluster`, one node: the server's version, nothing keyed.
        self.redis = Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=30)
        info: Any = await self.redis.info("server")
        self.valkey_version = str(info.get("valkey_version") or info.get("redis_version"))

    async def _start_split(self) -> None:
        self._valkey = await asyncio.to_thread(
            valkey, self.workdir / "valkey", appendonly=self.config.appendonly
        )
        self._track("valkey", self._valkey.pid)
        self.redis_url = self.cluster.redis_url = f"redis://127.0.0.1:{self._valkey.port}/0"
        await self._start_tokenrelay()

    async def _start_cluster(self) -> None:
        nodes = ValkeyCluster(
            self.workdir / "valkey-cluster",
            masters=self.config.cluster_masters,
            replicas=self.config.cluster_replicas,
        )
        self._valkey_cluster = nodes
        await asyncio.to_thread(nodes.start)
        masters = {n.port for n in await asyncio.to_thread(nodes.primaries)}
        counts = Counter[str]()
        for node in sorted(nodes.nodes, key=lambda n: (n.port not in masters, n.port)):
            kind = "m" if node.port in masters else "r"
            counts[kind] += 1
            label = f"{kind}{counts[kind]}"
            self._track(f"valkey:{label}", node.pid)
            self._nodes[label] = Redis(port=node.port, decode_responses=True, socket_timeout=30)
        self.keys = Keys(self.keys.prefix, shards=CLUSTER_SHARDS, cluster=True)
        self.redis_url = self.cluster.redis_url = nodes.url
        self.cluster.settings["TOKENRELAY_REDIS_CLUSTER"] = "true"
        self._cluster_client = RedisCluster.from_url(
            nodes.url, decode_responses=True, socket_timeout=30
        )
        await self._start_tokenrelay()

    async def _start_tokenrelay(self) -> None:
        """One `tokenrelay worker` and one `tokenrelay gateway` on `redis_url`."""
        if self.config.worker_uvloop:
            self.cluster.worker_argv = [sys.executable, "-c", UVLOOP_WORKER]
        self._track("worker", (await self.cluster.worker()).pid)
        gateway = await self.cluster.gateway()
        self._track("gateway", gateway.pid)
        self.gateway_url = gateway.url

    async def _start_serve(self) -> None:
        serve = await self.cluster.serve(workers=self.config.serve_workers, embedded=True)
        self._serve = psutil.Process(serve.pid)
        self._track("serve", serve.pid)
        self.gateway_url = serve.url
        self.redis_url = EmbeddedValkey(self.workdir / "data").adopt()
        if not self.redis_url:
            raise RuntimeError(f"serve's embedded Valkey was not found:\n{serve.log_tail()}")
        children = await processes(serve)
        self.worker_processes = sum(1 for p in children.values() if p["kind"] == "worker")
        self._find_children()

    async def stop(self) -> None:
        await asyncio.to_thread(self.cluster.stop)
        if self.http is not None:
            await self.http.close()
            self.http = None
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
        if self._valkey is not None:
            await asyncio.to_thread(self._valkey.stop)
            self._valkey = None
        for client in self._nodes.values():
            await client.aclose()
        self._nodes = {}
        if self._cluster_client is not None:
            await self._cluster_client.aclose()
            self._cluster_client = None
        if self._valkey_cluster is not None:
            await asyncio.to_thread(self._valkey_cluster.stop)
            self._valkey_cluster = None

    def remove_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def cluster_description(self) -> str:
        nodes = self._valkey_cluster
        if nodes is None:
            return ""
        return (
            f"a Valkey Cluster of {nodes.masters} masters + {nodes.replicas} replica(s) each, "
            f"{self.keys.shards} request shards"
        )

    # -- CPU accounting -----------------------------------------------------------

    def _track(self, role: str, pid: int) -> None:
        self._tracked[pid] = (role, psutil.Process(pid), (0.0, 0.0))

    def _find_children(self) -> None:
        """Every process under `serve` (replacements too), named by its role."""
        if self._serve is None:
            return
        try:
            children = self._serve.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            if child.pid in self._tracked:
                continue
            try:
                role = _role(child.cmdline())
            except psutil.NoSuchProcess:
                continue
            self._tracked[child.pid] = (role, child, (0.0, 0.0))

    @property
    def processes(self) -> dict[str, psutil.Process]:
        """One live process per role (the first worker under `serve`), for the profiler."""
        self._find_children()
        out: dict[str, psutil.Process] = {}
        for role, process, _ in self._tracked.values():
            if role not in out and process.is_running():
                out[role] = process
        return out

    def cpu_s(self) -> dict[str, tuple[float, float]]:
        """(user, system) CPU seconds each role has used so far, its processes summed."""
        self._find_children()
        out = {role: (0.0, 0.0) for role, _, _ in self._tracked.values()}
        for pid, (role, process, last) in list(self._tracked.items()):
            try:
                times = process.cpu_times()
                last = (times.user, times.system)
                self._tracked[pid] = (role, process, last)
            except psutil.NoSuchProcess:
                pass
            user, system = out[role]
            out[role] = (user + last[0], system + last[1])
        return out

    # -- what the harness reads -------------------------------------------------

    async def redis_connections(self) -> dict[str, int]:
        """Connections per client name (CLIENT LIST): tokenrelay-gateway, -gateway-read, ...;
        under `cluster`, summed over every node."""
        assert self.redis is not None
        names: Counter[str] = Counter()
        for client in list(self._nodes.values()) or [self.redis]:
            listed: Any = await client.client_list()
            names.update(str(c.get("name") or "-") for c in listed)
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
        """Until the workers hold no request (every answer ended). False on timeout."""
        assert self.redis is not None
        client: Redis | RedisCluster = self._cluster_client or self.redis
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            queued = [int(await client.xlen(key)) for key in self.keys.request_shards]
            if sum(queued) == 0:
                return True
            await asyncio.sleep(0.2)
        return False


def _role(cmdline: list[str]) -> str:
    """A child of `serve` by its command line: valkey-server, `tokenrelay gateway|worker`."""
    if cmdline and Path(cmdline[0]).name.startswith("valkey-server"):
        return "valkey"
    for role in ("gateway", "worker"):
        if role in cmdline:
            return role
    return "serve"
