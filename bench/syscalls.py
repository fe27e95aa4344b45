"""Below Python: each process's system calls and context switches per chunk.

py-spy shows where a process's Python is; most of what is left of a chunk's CPU is the
kernel's and the event loop's: the send that wakes the next process, the wait that is
woken. Here `perf stat` counts, for each process of one run on the split layout (the
gateway, the worker, Valkey, the mock model), from the moment the clients are told to
go until the last one is done: its CPU (`task-clock`), its context switches (each time
it went to sleep and was woken, or was preempted), all its system calls, and the ones
that carry a chunk (`read`, `write`/`writev`, `epoll_pwait`/`epoll_wait`) plus `getpid` (Python
3.11's `asyncio.get_running_loop()` makes one per call). Each is divided by the chunks
the model sent (one viewer per answer: as many deliveries).

Needs `perf` (Debian's linux-perf) and the kernel's syscall tracepoints (root); the
counters are the kernel's, so they cost the counted processes nothing measurable. Run it
alone with `python -m bench.syscalls` (`--help`).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, get_args

from bench.loop import run
from bench.runs import run_one
from bench.spec import Cell, Mode
from bench.stack import Stack, StackConfig

# perf's name of each counted event, and the column it goes to (several add up).
EVENTS = {
    "task-clock": "CPU us",
    "context-switches": "switches",
    "raw_syscalls:sys_enter": "syscalls",
    "syscalls:sys_enter_read": "read",
    "syscalls:sys_enter_write": "write",
    "syscalls:sys_enter_writev": "write",
    "syscalls:sys_enter_epoll_pwait": "epoll",  # uvloop's (libuv's)
    "syscalls:sys_enter_epoll_wait": "epoll",  # Valkey's
    "syscalls:sys_enter_getpid": "getpid",
}
COLUMNS = ("CPU us", "switches", "syscalls", "read", "write", "epoll", "getpid")
ROLES = ("gateway", "worker", "valkey", "mock")


NO_PERF = "perf is not installed (Debian: apt-get install linux-perf)"


def perf() -> str | None:
    return shutil.which("perf")


def parse(output: str) -> dict[str, float]:
    """`perf stat -x,` lines (value,unit,event,...) summed into COLUMNS; task-clock's
    milliseconds as µs. A counter perf could not read is left out."""
    out: dict[str, float] = {}
    for line in output.splitlines():
        parts = line.split(",")
        if len(parts) < 3 or parts[2] not in EVENTS:
            continue
        try:
            value = float(parts[0])
        except ValueError:  # "<not supported>", "<not counted>"
            continue
        column = EVENTS[parts[2]]
        if column == "CPU us":
            value *= 1000.0  # perf gives task-clock in milliseconds
        out[column] = out.get(column, 0.0) + value
    return out


class PerfPerProcess:
    """`perf` on each of some processes for one run: `start()` at its go, `finish()` at
    its end (the same places as bench.profile's Profiler); `_argv` says how."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._procs: dict[str, asyncio.subprocess.Process] = {}

    def _argv(self, role: str, pid: int) -> list[str]:
        raise NotImplementedError

    async def start(self) -> None:
        exe = perf()
        if exe is None:
            raise RuntimeError(NO_PERF)
        for role, pid in self.pids.items():
            self._procs[role] = await asyncio.create_subprocess_exec(
                exe,
                *self._argv(role, pid),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )

    async def _stop(self) -> dict[str, str]:
        """Each role's perf stopped (it prints or writes what it has, and exits): what it
        printed to stderr."""
        for proc in self._procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
        out = {}
        for role, proc in self._procs.items():
            _, err = await proc.communicate()
            out[role] = err.decode(errors="replace")
        return out


class SyscallCounter(PerfPerProcess):
    """`perf stat` counts of some processes for one run."""

    def _argv(self, role: str, pid: int) -> list[str]:
        return ["stat", "-x,", "-e", ",".join(EVENTS), "-p", str(pid)]

    async def finish(self) -> dict[str, dict[str, float]]:
        """Each role's counts since `start()`."""
        return {role: parse(err) for role, err in (await self._stop()).items()}


def per_chunk(counts: dict[str, dict[str, float]], chunks: int) -> dict[str, dict[str, float]]:
    return {
        role: {column: value / max(chunks, 1) for column, value in row.items()}
        for role, row in counts.items()
    }


def table(mode: str, rows: dict[str, dict[str, float]]) -> str:
    lines = [f"{mode:<9} {'process':<8}" + "".join(f"{c:>10}" for c in COLUMNS)]
    for role in ROLES:
        row = rows.get(role)
        if row is None:
            continue
        cells = "".join(
            f"{'-':>10}" if c not in row else f"{row[c]:>10.{1 if c == 'CPU us' else 2}f}"
            for c in COLUMNS
        )
        lines.append(f"{'':<9} {role:<8}{cells}")
    return "\n".join(lines)


def _mode(text: str) -> Mode:
    for mode in get_args(Mode):
        if text == mode:
            return mode  # type: ignore[no-any-return]
    raise SystemExit(f"unknown mode {text!r}: one of {', '.join(get_args(Mode))}")


async def _main(args: argparse.Namespace) -> int:
    if perf() is None:
        print(NO_PERF, file=sys.stderr)
        return 2
    cell = Cell(args.answers, 1, args.rate, args.tokens)
    modes = [_mode(m) for m in args.modes.split(",") if m]
    workdir = Path(tempfile.mkdtemp(prefix="tokenrelay-syscalls-"))
    config = StackConfig(worker_concurrency=args.answers + 10, retention_s=600)
    kw: dict[str, Any] = {"ramp_s": args.ramp_s, "most_clients": args.clients, "workdir": workdir}
    print(
        f"{args.answers} answers x {args.rate:g} tokens/s x {args.tokens} tokens, 1 viewer each, "
        "split layout; per chunk the model sent, from the clients' go to the last one done"
    )
    try:
        async with Stack(workdir, config) as stack:
            pids = {role: p.pid for role, p in stack.processes.items() if role in ROLES}
            for mode in modes:
                counter = SyscallCounter(
                    {r: pid for r, pid in pids.items() if mode != "direct" or r == "mock"}
                )
                figures = await run_one(stack, cell, mode, counter=counter, **kw)
                chunks = int(figures.get("chunks_written") or figures["expected_deliveries"])
                print(table(mode, per_chunk(figures["syscalls"], chunks)), flush=True)
                if not figures["complete"]:
                    print(f"{mode}: the run lost chunks; its figures are not clean", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.syscalls", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--answers", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s per answer")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per answer")
    parser.add_argument("--modes", default="direct,socketio,sse")
    parser.add_argument("--ramp-s", type=float, default=1.0, help="answers start over this")
    parser.add_argument("--clients", type=int, default=4, help="client processes at most")
    raise SystemExit(run(_main(parser.parse_args())))


if __name__ == "__main__":
    main()
