"""The issues' targets, each judged PASS, FAIL or NOT RUN from the figures of one run, on
each layout (the split one and the default `serve`). Never loosened; a target whose cell
was not part of the invocation is NOT RUN, and says which cell it needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OVERHEAD_P50_MS = 1.0
OVERHEAD_P99_MS = 5.0
ONE_ANSWER_P50_MS = 0.7
WORKER_US = 80.0
GATEWAY_US = 40.0
VALKEY_US = 25.0
WORKER_CHUNKS_PER_S = 15_000.0
TTFC_MS = 2.0
BURST_TTFC_MS = 50.0
OWN_US = 150.0
SCALE_P99_MS = 50.0
MEMORY_BYTES = 40_000  # "40 KB", read strictly
MEMORY_TOKENS = 500
RELAYED = ("socketio", "sse")

Run = dict[str, Any]
Verdict = dict[str, str]


@dataclass(frozen=True, slots=True)
class Need:
    """A cell a target is judged on: `burst` = every answer asked at the same instant."""

    answers: int
    viewers: int
    rate: float
    burst: bool = False

    @property
    def spec(self) -> str:
        """As `--serve-cells` takes it."""
        return f"{self.answers}x{self.viewers}@{self.rate:g}" + (":burst" if self.burst else "")


AT_TARGET = Need(100, 1, 20.0)
ONE = Need(1, 1, 20.0)
BURST = Need(100, 1, 20.0, burst=True)
# Asked at once, so the worker has all of it from the first instant to the last.
UNTHROTTLED = Need(100, 1, 0.0, burst=True)
SCALE = Need(1000, 1, 20.0)
TARGET_CELLS = (ONE, AT_TARGET, BURST, UNTHROTTLED, SCALE)


def _is_burst(run: Run) -> bool:
    return bool(run.get("burst", False))


def find(runs: list[Run], need: Need, mode: str) -> Run | None:
    for run in runs:
        key = (run["answers"], run["viewers"], run["rate"], _is_burst(run), run["mode"])
        if key == (need.answers, need.viewers, need.rate, need.burst, mode):
            return run
    return None


def _verdict(
    name: str, target: str, status: str, measured: str, note: str = "", layout: str = ""
) -> Verdict:
    return {
        "layout": layout,
        "name": name,
        "target": target,
        "status": status,
        "measured": measured,
        "note": note,
    }


def _p(figures: dict[str, Any], key: str) -> float:
    return float(figures.get(key, float("inf")))


# A measure: (the transport's run, the same cell's direct run) -> (within target, shown as);
# None when the run's results have no such figure (saved by an older benchmark).
Measure = Callable[[Run, Run | None], tuple[bool | None, str]]


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    target: str
    need: Need
    measure: Measure
    direct: bool = False  # judged against the same cell's direct run


def _overhead(run: Run, direct: Run | None) -> tuple[bool, str]:
    assert direct is not None
    lat, base = run["latency_ms"], direct["latency_ms"]
    o50, o99 = _p(lat, "p50") - _p(base, "p50"), _p(lat, "p99") - _p(base, "p99")
    text = f"p50 {o50:+.2f} ms, p99 {o99:+.2f} ms"
    return o50 <= OVERHEAD_P50_MS and o99 <= OVERHEAD_P99_MS, text


def _one_answer(run: Run, direct: Run | None) -> tuple[bool, str]:
    assert direct is not None
    o50 = _p(run["latency_ms"], "p50") - _p(direct["latency_ms"], "p50")
    return o50 <= ONE_ANSWER_P50_MS, f"p50 {o50:+.2f} ms"


def _cpu(key: str, most_us: float) -> Measure:
    def measure(run: Run, direct: Run | None) -> tuple[bool | None, str]:
        if key not in run["cpu_us_per_chunk"]:
            return None, f"no {key} in these results"
        value = run["cpu_us_per_chunk"][key]
        if value is None:
            return False, "not measured"
        return value <= most_us, f"{value:.0f} us"

    return measure


def _worker_rate(run: Run, direct: Run | None) -> tuple[bool, str]:
    written = run.get("chunks_written") or 0
    processes = max(1, int(run.get("worker_processes") or 1))
    per_process = written / max(1e-9, float(run["wall_s"])) / processes
    text = f"{per_process:,.0f} chunks/s"
    if processes > 1:
        text += f" per process ({processes} processes)"
    return per_process >= WORKER_CHUNKS_PER_S, text


def _ttfc(most_ms: float) -> Measure:
    def measure(run: Run, direct: Run | None) -> tuple[bool, str]:
        assert direct is not None
        over = _p(run["ttfc_ms"], "p50") - _p(direct["ttfc_ms"], "p50")
        return over <= most_ms, f"p50 {over:+.1f} ms"

    return measure


def _scale(run: Run, direct: Run | None) -> tuple[bool, str]:
    p99 = _p(run["latency_ms"], "p99")
    return p99 <= SCALE_P99_MS, f"p99 {p99:,.1f} ms at {run['chunks_per_s']:,.0f} chunks/s"


TARGETS = (
    Target(
        "relay overhead over direct, 100 answers x 20/s",
        f"p50 <= +{OVERHEAD_P50_MS:g} ms and p99 <= +{OVERHEAD_P99_MS:g} ms",
        AT_TARGET,
        _overhead,
        direct=True,
    ),
    Target(
        "relay overhead over direct, 1 answer x 20/s",
        f"p50 <= +{ONE_ANSWER_P50_MS:g} ms",
        ONE,
        _one_answer,
        direct=True,
    ),
    Target(
        "worker CPU per chunk written, 100 x 20/s (all worker processes)",
        f"<= {WORKER_US:g} us",
        AT_TARGET,
        _cpu("worker_per_written", WORKER_US),
    ),
    Target(
        "gateway CPU per chunk delivered, 100 x 20/s",
        f"<= {GATEWAY_US:g} us",
        AT_TARGET,
        _cpu("gateway_per_delivery", GATEWAY_US),
    ),
    Target(
        "Valkey CPU per chunk written, 100 x 20/s",
        f"<= {VALKEY_US:g} us",
        AT_TARGET,
        _cpu("valkey_per_written", VALKEY_US),
    ),
    Target(
        "chunks/s one worker process writes, 100 unthrottled answers asked at once",
        f">= {WORKER_CHUNKS_PER_S:,.0f} (written / wall / worker processes)",
        UNTHROTTLED,
        _worker_rate,
    ),
    Target(
        "time to first chunk over direct, 100 answers x 20/s",
        f"p50 <= +{TTFC_MS:g} ms",
        AT_TARGET,
        _ttfc(TTFC_MS),
        direct=True,
    ),
    Target(
        "time to first chunk over direct, 100 answers asked at once",
        f"p50 <= +{BURST_TTFC_MS:g} ms",
        BURST,
        _ttfc(BURST_TTFC_MS),
        direct=True,
    ),
    Target(
        "tokenrelay's own CPU (all its processes) per chunk delivered, 100 x 20/s",
        f"<= {OWN_US:g} us",
        AT_TARGET,
        _cpu("tokenrelay_per_delivery", OWN_US),
    ),
    Target(
        "1,000 answers x 20/s",
        f"p99 <= {SCALE_P99_MS:g} ms, every chunk delivered",
        SCALE,
        _scale,
    ),
)


def judge(target: Target, runs: list[Run], layout: str) -> Verdict:
    """One target on one layout, over both relayed transports: PASS only when both ran and
    both are within it; FAIL when one ran and is not; otherwise NOT RUN, saying why."""
    direct = find(runs, target.need, "direct") if target.direct else None
    parts, oks, missing = [], [], []
    for mode in RELAYED:
        run = find(runs, target.need, mode)
        if run is None or (target.direct and direct is None):
            missing.append(mode if run is None else "direct")
            continue
        ok, text = target.measure(run, direct)
        if ok is None:
            missing.append(f"{mode} ({text})")
            continue
        if not run["complete"]:
            ok, text = False, f"{text}, NOT every chunk delivered"
        parts.append(f"{mode} {text}")
        oks.append(ok)
    note = ""
    if missing:
        note = f"not run here: cell {target.need.spec}, {', '.join(sorted(set(missing)))}"
    if oks and not all(oks):
        status = "FAIL"
    elif oks and not missing:
        status = "PASS"
    else:
        status = "NOT RUN"
    measured = "; ".join(parts) or "-"
    return _verdict(target.name, target.target, status, measured, note, layout)


def connections(runs: list[Run], checks: list[Run]) -> Verdict:
    name = "Redis connections per gateway process, 1 viewer vs 10,000"
    target = "the same count"
    relayed = [r for r in [*runs, *checks] if r["mode"] in RELAYED]
    if not relayed:
        return _verdict(name, target, "NOT RUN", "-", layout="split")
    seen = [r for r in relayed if r["redis_connections"]["viewers_max"] > 0]
    if not seen:
        note = "no viewer was seen by the sampler"
        return _verdict(name, target, "NOT RUN", "-", note, "split")
    fewest = min(seen, key=lambda r: r["redis_connections"]["viewers_max"])
    most = max(seen, key=lambda r: r["redis_connections"]["viewers_max"])
    counts = {
        c
        for r in relayed
        for c in (r["redis_connections"]["gateway_min"], r["redis_connections"]["gateway_max"])
    }
    lo, hi = fewest["redis_connections"], most["redis_connections"]
    measured = (
        f"{lo['gateway_max']} at {lo['viewers_max']} viewers, {hi['gateway_max']} at "
        f"{hi['viewers_max']} viewers; every sample of every run: {sorted(counts)}"
    )
    if hi["viewers_max"] < 10_000:
        note = "no run reached 10,000 viewers (--connection-check)"
        return _verdict(name, target, "NOT RUN", measured, note, "split")
    status = "PASS" if len(counts) == 1 else "FAIL"
    return _verdict(name, target, status, measured, layout="split")


def memory(figures: dict[str, Any] | None) -> Verdict:
    name = "Redis memory per finished 500-token answer, gone after retention"
    target = f"<= {MEMORY_BYTES:,} bytes (stream + record), then 0"
    if not figures or figures.get("tokens") != MEMORY_TOKENS:
        return _verdict(name, target, "NOT RUN", "-", "--memory-answers 0", "split")
    total = figures["total_bytes"]
    gone = figures["gone_after_s"]
    ok = total <= MEMORY_BYTES and gone is not None
    measured = (
        f"{total:,} bytes ({figures['stream_bytes']:,} stream + {figures['record_bytes']:,} "
        f"record); TTL {figures['ttl_s_when_finished']} s when it ended (retention "
        f"{figures['retention_s']} s); "
        + (f"both keys gone when checked {gone:g} s later" if gone is not None else "NOT gone")
    )
    return _verdict(name, target, "PASS" if ok else "FAIL", measured, layout="split")


def cpu_printed(runs: list[Run], layout: str) -> Verdict:
    name = "CPU per chunk, from each process's own accounting, for every run"
    target = "gateway us per delivery and worker us per chunk written, printed"
    relayed = [r for r in runs if r["mode"] in RELAYED]
    if not relayed:
        return _verdict(name, target, "NOT RUN", "-", layout=layout)
    per = [r["cpu_us_per_chunk"] for r in relayed]
    # Present, not positive: a tiny run may use less than a clock tick of a process.
    ok = all(p["gateway_per_delivery"] is not None and p["worker_per_written"] is not None
             for p in per)  # fmt: skip
    gw = [p["gateway_per_delivery"] for p in per if p["gateway_per_delivery"] is not None]
    wk = [p["worker_per_written"] for p in per if p["worker_per_written"] is not None]
    measured = (
        f"gateway {min(gw):.0f}-{max(gw):.0f} us/delivery, "
        f"worker {min(wk):.0f}-{max(wk):.0f} us/chunk over {len(relayed)} runs"
        if gw and wk
        else "-"
    )
    return _verdict(name, target, "PASS" if ok else "FAIL", measured, layout=layout)


def evaluate(
    runs: list[Run],
    memory_figures: dict[str, Any] | None,
    checks: list[Run] | None = None,
    serve_runs: list[Run] | None = None,
) -> list[Verdict]:
    """`runs`: the sweep, on the split layout (gateway + worker); `checks`: runs outside it
    (the 10,000-viewer connection check); `serve_runs`: the default `serve` layout's.
    Every target of TARGETS is judged on both layouts."""
    out = [judge(t, runs, "split") for t in TARGETS]
    out += [judge(t, serve_runs or [], "serve") for t in TARGETS]
    out += [connections(runs, checks or []), memory(memory_figures)]
    out += [cpu_printed(runs, "split"), cpu_printed(serve_runs or [], "serve")]
    return out
