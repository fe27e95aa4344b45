"""Where the CPU goes: py-spy samples a process during a run; this boils the stacks down.

py-spy records only samples where the process is on CPU (idle waits are left out), so
each share below is a share of the process's busy time.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

SAMPLE_RATE_HZ = 200
TOP = 12

# tokenrelay's command line and the ASGI wrapper every request passes through: not work.
ENTRY_FILES = frozenset(
    {"tokenrelay", "tokenrelay/cli.py", "tokenrelay/__main__.py", "tokenrelay/gateway/app.py"}
)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def area_of(path: str) -> str:
    """The package of a frame's file as py-spy names it (`redis/connection.py` -> `redis`).
    tokenrelay's command line, which only starts the server or the loop, is `entry`."""
    if path.startswith("<") or path in ENTRY_FILES:
        return "entry"
    top = path.split("/", 1)[0].removesuffix(".py")
    return f"{top} (stdlib)" if top in sys.stdlib_module_names else top


def _split(frame: str) -> tuple[str, str]:
    """("function (file.py)", "package/file.py") of one py-spy frame."""
    match = _FRAME.match(frame)
    if match is None:
        return frame, "?"
    file = match["file"]
    return f"{match['func']} ({file.rsplit('/', 1)[-1]})", file


LOOP_FRAMES = ("Runner.run (", "Handle._run (", "EpollSelector.select (")


def owner_of(code: list[tuple[str, str]]) -> str:
    """The package a sample's CPU goes to: its leaf frame's, or, when the leaf is in the
    standard library (asyncio, contextlib, json, ...), the nearest caller's that is not.
    `event loop` when the sample sits in the loop itself (uvloop's C code, under
    `Runner.run`; the selector), not in a callback."""
    if code[-1][0].startswith(LOOP_FRAMES):
        return "event loop"
    for _, file in reversed(code):
        area = area_of(file)
        if not area.endswith("(stdlib)") and area != "entry" and not area.startswith("<"):
            return area
    return "event loop"


def summarise(collapsed: str) -> dict[str, Any]:
    """Busy samples by package (standard library folded into its caller), by package of
    the leaf frame, by function (leaf), and inclusive time of tokenrelay's functions."""
    own: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    owners: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        code = [_split(f) for f in stack.split(";") if f]
        if not code:
            continue
        total += count
        leaf, leaf_file = code[-1]
        own[leaf] += count
        areas[area_of(leaf_file)] += count
        owners[owner_of(code)] += count
        for name in {name for name, file in code if area_of(file) == "tokenrelay"}:
            inclusive[name] += count

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(TOP)]

    return {
        "samples": total,
        "by_package_pct": share(owners),
        "self_by_package_pct": share(areas),
        "self_by_function_pct": share(own),
        "tokenrelay_inclusive_pct": share(inclusive),
    }


class Profiler:
    """py-spy on some processes for one run. `start()` before it, `finish()` after."""

    def __init__(self, pids: dict[str, int], duration_s: float, workdir: Path, tag: str) -> None:
        self.pids = pids
        self.tag = tag
        self.duration_s = duration_s
        self.workdir = workdir
        self._procs: dict[str, asyncio.subprocess.Process] = {}

    def path(self, role: str) -> Path:
        return self.workdir / f"profile-{self.tag}-{role}.txt"

    async def start(self) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed: pip install 'tokenrelay[bench]'")
        for role, pid in self.pids.items():
            self._procs[role] = await asyncio.create_subprocess_exec(
                exe,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(SAMPLE_RATE_HZ),
                "--duration",
                str(max(1, int(self.duration_s))),
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(self.path(role)),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )

    async def finish(self) -> dict[str, Any]:
        out = {}
        for role, proc in self._procs.items():
            try:
                async with asyncio.timeout(self.duration_s + 30):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
            path = self.path(role)
            out[role] = summarise(path.read_text()) if path.exists() else {"samples": 0}
        return out
