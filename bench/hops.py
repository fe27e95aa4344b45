"""One chunk's steps inside the worker and the gateway, traced at the system-call level.

At one answer a chunk crosses each process in one piece of work: the worker reads the
model's chunk and writes its script call to Valkey; the gateway reads Valkey's doorbell
message and writes to the viewer's socket. `perf trace -e read,write,writev` on each of
the two during a run on the split layout gives, per chunk, the time from that read to
that write (the process's own work, run cold after the pause between chunks), and the
worker's time from its write to Valkey's reply.

The connections are told apart by what they carry: the worker's Valkey connection is the
one it writes to most, its model connection the other one it reads chunks from; the
gateway's viewer socket is the one it writes to most, its doorbell the one it reads from
most besides. `perf trace` adds its own cost to each traced call, so each figure is a
little high; compare runs made the same way. Needs `perf` (Debian's linux-perf) with the
kernel's syscall tracepoints (root). Run it alone with `python -m bench.hops` (`--help`).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.loop import run
from bench.runs import run_one
from bench.spec import Cell
from bench.stack import Stack, StackConfig
from bench.syscalls import NO_PERF, PerfPerProcess, perf

ROLES = ("worker", "gateway")
_LINE = re.compile(r"\s*([\d.]+) \(\s*[\d.]+ ms\): (?:\S+/\d+ )?(\w+)\(fd: (\d+).*= (-?\d+)")
_READS = ("read", "recvfrom")
_WRITES = ("write", "writev", "sendto")
NEXT_WITHIN_MS = 20.0  # a write further than this from the read is not that chunk's


@dataclass(frozen=True, slots=True)
class Call:
    at_ms: float
    name: str
    fd: int
    result: int

    @property
    def reads(self) -> bool:
        return self.name in _READS and self.result > 0

    @property
    def writes(self) -> bool:
        return self.name in _WRITES and self.result > 0


def parse(trace: str) -> list[Call]:
    """`perf trace` lines (`0.041 ( 0.026 ms): read(fd: 33, ...) = 282`) as calls, in order."""
    calls = []
    for line in trace.splitlines():
        m = _LINE.match(line)
        if m:
            calls.append(Call(float(m[1]), m[2], int(m[3]), int(m[4])))
    return calls


def _most(counts: Counter[int], besides: int | None = None) -> int | None:
    for fd, _ in counts.most_common():
        if fd != besides:
            return fd
    return None


def steps(calls: list[Call], *, inbound: int, outbound: int) -> list[tuple[float, float | None]]:
    """Per read on `inbound`: µs to the next write on `outbound`, and from that write to the
    next read on it (its reply; None when no read came within NEXT_WITHIN_MS)."""
    out: list[tuple[float, float | None]] = []
    for i, call in enumerate(calls):
        if not (call.reads and call.fd == inbound):
            continue
        write = next((c for c in calls[i + 1 :] if c.writes and c.fd == outbound), None)
        if write is None or write.at_ms - call.at_ms > NEXT_WITHIN_MS:
            continue
        after = calls[calls.index(write, i) + 1 :]
        reply = next((c for c in after if c.reads and c.fd == outbound), None)
        back = None
        if reply is not None and reply.at_ms - write.at_ms <= NEXT_WITHIN_MS:
            back = (reply.at_ms - write.at_ms) * 1000
        out.append(((write.at_ms - call.at_ms) * 1000, back))
    return out


def worker_steps(calls: list[Call]) -> list[tuple[float, float | None]]:
    """The model's chunk read → the write to Valkey (→ Valkey's reply)."""
    valkey = _most(Counter(c.fd for c in calls if c.writes))
    model = _most(Counter(c.fd for c in calls if c.reads and c.result > 100), besides=valkey)
    if valkey is None or model is None:
        return []
    return steps(calls, inbound=model, outbound=valkey)


def gateway_steps(calls: list[Call]) -> list[tuple[float, float | None]]:
    """The doorbell's message read → the write to the viewer's socket."""
    viewer = _most(Counter(c.fd for c in calls if c.writes))
    doorbell = _most(Counter(c.fd for c in calls if c.reads), besides=viewer)
    if viewer is None or doorbell is None:
        return []
    return [(there, None) for there, _ in steps(calls, inbound=doorbell, outbound=viewer)]


def summary(label: str, found: list[tuple[float, float | None]]) -> str:
    if not found:
        return f"{label}: no chunk followed (too few calls traced)"
    there = [t for t, _ in found]
    text = (
        f"{label}: p50 {statistics.median(there):.0f} us (min {min(there):.0f}) over "
        f"{len(there)} chunks"
    )
    back = [b for _, b in found if b is not None]
    if back:
        text += f"; write -> its reply read p50 {statistics.median(back):.0f} us"
    return text


class HopTracer(PerfPerProcess):
    """`perf trace` of some processes for one run, each to a file in `folder` (a
    `bench.runs.Counter`, as bench.syscalls' SyscallCounter)."""

    def __init__(self, pids: dict[str, int], folder: Path) -> None:
        super().__init__(pids)
        self.folder = folder

    def _argv(self, role: str, pid: int) -> list[str]:
        out = self.folder / f"{role}.trace"
        return ["trace", "-e", "read,write,writev", "-p", str(pid), "-o", str(out)]

    async def finish(self) -> dict[str, dict[str, float]]:
        await self._stop()
        return {}  # the traces are read with `calls`

    def calls(self, role: str) -> list[Call]:
        path = self.folder / f"{role}.trace"
        return parse(path.read_text(errors="replace")) if path.exists() else []


async def _main(args: argparse.Namespace) -> int:
    if perf() is None:
        print(NO_PERF, file=sys.stderr)
        return 2
    cell = Cell(1, 1, args.rate, args.tokens)
    workdir = Path(tempfile.mkdtemp(prefix="tokenrelay-hops-"))
    print(
        f"1 answer x {args.rate:g} tokens/s x {args.tokens} tokens, 1 Socket.IO viewer, split "
        f"layout, {args.runs} runs; perf trace on the worker and the gateway"
    )
    try:
        async with Stack(workdir, StackConfig(worker_concurrency=10, retention_s=600)) as stack:
            pids = {role: p.pid for role, p in stack.processes.items() if role in ROLES}
            for n in range(args.runs):
                tracer = HopTracer(pids, workdir / f"run{n}")
                tracer.folder.mkdir()
                figures = await run_one(
                    stack,
                    cell,
                    "socketio",
                    ramp_s=0.0,
                    most_clients=1,
                    workdir=workdir,
                    counter=tracer,
                )
                worker = worker_steps(tracer.calls("worker"))
                gateway = gateway_steps(tracer.calls("gateway"))
                print(f"run {n + 1}:")
                print("  " + summary("worker, model read -> Valkey write", worker))
                print("  " + summary("gateway, Valkey read -> viewer write", gateway))
                if not figures["complete"]:
                    print("  the run lost chunks; its figures are not clean")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hops", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s of the answer")
    parser.add_argument("--tokens", type=int, default=200, help="tokens of the answer")
    parser.add_argument("--runs", type=int, default=3)
    raise SystemExit(run(_main(parser.parse_args())))


if __name__ == "__main__":
    main()
