"""One run: a cell of the sweep over one transport, driven by client processes, measured.

CPU is read from each process's own accounting (psutil for the system under test,
getrusage inside each client) between the moment every client is connected and the
moment the last one is done, so connecting 10,000 sockets is not charged to the chunks.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import orjson

from bench import ROOT
from bench.clients import SERIES
from bench.profile import Profiler
from bench.spec import Cell, Load, Mode
from bench.stack import Stack
from bench.stats import read_ns, summary_ms

READY_TIMEOUT_S = 180.0
SAMPLE_EVERY_S = 1.0  # a /healthz and a CLIENT LIST each time: kept rare
IDLE_TIMEOUT_S = 120.0
GO_DELAY_S = 0.3
EXIT_TIMEOUT_S = 30.0
OWN_ROLES = ("gateway", "worker", "valkey", "serve")


class Counter(Protocol):
    """Counts something of the stack's processes over a run (bench.syscalls)."""

    async def start(self) -> None: ...

    async def finish(self) -> dict[str, dict[str, float]]: ...


def run_timeout_s(cell: Cell, ramp_s: float) -> float:
    """Generous: an answer's own length, plus time to drain what a slow system queues,
    plus 20 ms per answer to ask and attach (1,000 asks took 13-20 s to their first chunks
    on the shared 2-core machine)."""
    own_s = cell.tokens / cell.rate if cell.rate else 0.0
    return min(240.0, ramp_s + own_s + 20.0 + cell.deliveries / 5000 + cell.answers / 50)


def client_processes(cell: Cell, most: int) -> int:
    sockets = cell.answers * cell.viewers
    return 1 if sockets < 20 else max(1, min(most, cell.answers))


class ClientProcess:
    def __init__(self, load: Load, log: Path) -> None:
        self.load = load
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.clients",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=ROOT,
            )
        await self.send(orjson.dumps(self.load.to_json()).decode())

    async def send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def expect(self, word: str) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        line = (await self.proc.stdout.readline()).decode().strip()
        if line != word:
            await self.proc.wait()
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"client process said {line!r}, expected {word!r}:\n{tail}")

    async def finish(self) -> dict[str, Any]:
        assert self.proc is not None
        try:
            async with asyncio.timeout(EXIT_TIMEOUT_S):
                await self.proc.wait()
        except TimeoutError:  # its results are written before it says `done`
            await self.kill()
        summary: dict[str, Any] = orjson.loads(
            Path(self.load.out).with_suffix(".json").read_bytes()
        )
        return summary

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            try:  # bounded: a child whose exit is never reported must not hang the bench
                async with asyncio.timeout(EXIT_TIMEOUT_S):
                    await self.proc.wait()
            except TimeoutError:
                print(f"bench: client process {self.proc.pid} did not exit", file=sys.stderr)


class Sampler:
    """Redis connections and gateway viewers, sampled while a run goes."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.gateway: list[int] = []
        self.worker: list[int] = []
        self.viewers: list[int] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop sampling; safe to call twice. The loop also checks a flag: a cancel that
        lands while aiohttp's own timeout of a /healthz fires comes out of aiohttp as a
        TimeoutError, which `Stack.viewers` takes for a failed request, and the loop went
        on sampling, once a second, while this waited for it (a quick sweep hung 9 min)."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def sample(self) -> None:
        conns = await self.stack.redis_connections()
        self.gateway.append(conns["gateway"])
        self.worker.append(conns["worker"])
        self.viewers.append(await self.stack.viewers())

    async def _loop(self) -> None:
        while not self._stopping:
            await self.sample()
            await asyncio.sleep(SAMPLE_EVERY_S)

    def figures(self) -> dict[str, int]:
        return {
            "gateway_min": min(self.gateway, default=0),
            "gateway_max": max(self.gateway, default=0),
            "worker_max": max(self.worker, default=0),
            "viewers_max": max(self.viewers, default=0),
        }


async def run_one(
    stack: Stack,
    cell: Cell,
    mode: Mode,
    *,
    ramp_s: float,
    most_clients: int,
    workdir: Path,
    profile_s: float = 0.0,
    counter: Counter | None = None,
) -> dict[str, Any]:
    """Run `cell` over `mode`. With `profile_s`, py-spy samples the gateway and the worker
    for that long from the start (those figures are then not clean measurements). A
    `counter` (bench.syscalls) counts from the clients' go to the last one done; its
    counts are `figures["syscalls"]`."""
    nonces = [secrets.token_hex(8) for _ in range(cell.answers)]
    n_proc = client_processes(cell, most_clients)
    share = -(-cell.answers // n_proc)
    target = f"{stack.mock_url}/v1" if mode == "direct" else stack.gateway_url
    ramp_s = 0.0 if cell.burst else ramp_s
    timeout_s = run_timeout_s(cell, ramp_s)
    tag = f"{mode}-{cell.answers}x{cell.viewers}-{cell.rate:g}-{secrets.token_hex(2)}"
    clients = []
    for i in range(0, cell.answers, share):
        load = Load(
            mode=mode,
            target_url=target,
            mock_url=stack.mock_url,
            nonces=nonces[i : i + share],
            first_index=i,
            total_answers=cell.answers,
            viewers=cell.viewers,
            tokens=cell.tokens,
            rate=cell.rate,
            ramp_s=ramp_s,
            timeout_s=timeout_s,
            out=str(workdir / f"{tag}-{i}"),
        )
        clients.append(ClientProcess(load, workdir / f"{tag}-{i}.log"))
    sampler = Sampler(stack)
    profiler = None
    if profile_s:
        pids = {role: stack.processes[role].pid for role in ("gateway", "worker")}
        profiler = Profiler(pids, profile_s, workdir, tag)
    try:
        await asyncio.gather(*(c.start() for c in clients))
        async with asyncio.timeout(READY_TIMEOUT_S):
            await asyncio.gather(*(c.expect("ready") for c in clients))
        await stack.mock_chunks(reset=True)
        cpu_before = stack.cpu_s()
        go_ns = time.time_ns() + int(GO_DELAY_S * 1e9)
        sampler.start()
        await asyncio.gather(*(c.send(f"go {go_ns}") for c in clients))
        if profiler is not None:
            await profiler.start()
        if counter is not None:
            await counter.start()
        async with asyncio.timeout(timeout_s + 60):
            await asyncio.gather(*(c.expect("done") for c in clients))
        cpu_after = stack.cpu_s()
        counts = await counter.finish() if counter is not None else None
        await sampler.stop()
        await sampler.sample()
        summaries = await asyncio.gather(*(c.finish() for c in clients))
    finally:
        await sampler.stop()
        await asyncio.gather(*(c.kill() for c in clients))
    written = await stack.mock_chunks(reset=True)
    idle = await stack.wait_idle(IDLE_TIMEOUT_S)
    outs = [Path(c.load.out) for c in clients]
    series = {name: read_ns(p.with_suffix(f".{name}") for p in outs) for name in SERIES}
    figures = _figures(
        cell, mode, summaries, series, cpu_before, cpu_after, written, sampler, go_ns, idle
    )
    figures["layout"] = stack.config.layout
    figures["worker_processes"] = stack.worker_processes
    figures["burst"] = ramp_s == 0.0
    figures["ramp_s"] = ramp_s
    if profiler is not None:
        figures["profile"] = await profiler.finish()
    if counts is not None:
        figures["syscalls"] = counts
    return figures


def _figures(
    cell: Cell,
    mode: Mode,
    summaries: list[dict[str, Any]],
    series: dict[str, list[int]],
    cpu_before: dict[str, tuple[float, float]],
    cpu_after: dict[str, tuple[float, float]],
    written: int,
    sampler: Sampler,
    go_ns: int,
    idle: bool,
) -> dict[str, Any]:
    deliveries = sum(s["deliveries"] for s in summaries)
    wall_s = max(1e-9, (max(s["ended_ns"] for s in summaries) - go_ns) / 1e9)
    start = {role: cpu_before.get(role, (0.0, 0.0)) for role in cpu_after}
    user = {role: cpu_after[role][0] - start[role][0] for role in cpu_after}
    system = {role: cpu_after[role][1] - start[role][1] for role in cpu_after}
    cpu = {role: round(user[role] + system[role], 3) for role in cpu_after}
    # A cluster's nodes are tracked one by one ("valkey:m1", "valkey:r1", ...): summed too.
    nodes = {role: s for role, s in cpu.items() if role.startswith("valkey:")}
    if nodes:
        cpu["valkey"] = round(sum(nodes.values()), 3)
    cpu["clients"] = round(sum(s["cpu_s"] for s in summaries), 3)
    kernel = {role: round(system[role] / cpu[role], 2) if cpu[role] else 0.0 for role in system}
    errors = sorted({e for s in summaries for e in s["errors"]})[:5]
    viewers = sum(s["viewers"] for s in summaries)
    done = sum(s["viewers_done"] for s in summaries)

    relayed = mode != "direct"

    def per(role: str, count: int) -> float | None:
        return round(cpu[role] * 1e6 / count, 1) if count and role in cpu else None

    # tokenrelay's own CPU, every process of it (under serve: supervisor, gateway, workers
    # and the embedded Valkey), per chunk a viewer received.
    own = sum(cpu.get(role, 0.0) for role in OWN_ROLES)

    return {
        "answers": cell.answers,
        "viewers": cell.viewers,
        "rate": cell.rate,
        "tokens": cell.tokens,
        "mode": mode,
        "complete": done == viewers and not errors,
        "viewers_done": done,
        "viewer_count": viewers,
        "errors": errors,
        "expected_deliveries": cell.deliveries,
        "deliveries": deliveries,
        # Entries that carried them (a worker behind coalesces chunks into one entry).
        "entries_delivered": sum(s.get("entries", 0) for s in summaries) if relayed else None,
        "chunks_written": written if relayed else None,
        "unmatched_chunks": sum(s["unmatched_chunks"] for s in summaries),
        "wall_s": round(wall_s, 2),
        "chunks_per_s": round(deliveries / wall_s, 1),
        "offered_chunks_per_s": cell.answers * cell.viewers * cell.rate or None,
        "latency_ms": summary_ms(series["lat"]),
        "ttfc_ms": summary_ms(series["ttfc"]),
        # Split at the entry ID's time, which has 1 ms resolution.
        "hops_ms": {
            "model_to_redis": summary_ms(series["to_redis"]),
            "redis_to_client": summary_ms(series["from_redis"]),
        }
        if relayed
        else None,
        "cpu_s": cpu,
        "cpu_util": {role: round(s / wall_s, 3) for role, s in cpu.items()},
        "cpu_kernel_share": kernel,
        "cpu_us_per_chunk": {
            "gateway_per_delivery": per("gateway", deliveries) if relayed else None,
            "worker_per_written": per("worker", written) if relayed else None,
            "valkey_per_written": per("valkey", written) if relayed else None,
            "mock_per_sent": per("mock", written if relayed else deliveries),
            "clients_per_delivery": per("clients", deliveries),
            "tokenrelay_per_delivery": round(own * 1e6 / deliveries, 1)
            if relayed and deliveries
            else None,
            "valkey_nodes_per_written": {role: per(role, written) for role in sorted(nodes)}
            if relayed and nodes
            else None,
        },
        "chunks_written_per_s": round(written / wall_s, 1) if relayed else None,
        "redis_connections": sampler.figures(),
        "client_loop_lag_p99_ms": max(s["loop_lag_p99_ms"] for s in summaries),
        "idle_after": idle,
    }
