"""The issue's targets, each judged PASS, FAIL or NOT RUN from a sweep's figures. Never loosened."""

from __future__ import annotations

from typing import Any

OVERHEAD_P50_MS = 1.0
OVERHEAD_P99_MS = 5.0
SCALE_P99_MS = 50.0
MEMORY_BYTES = 40_000  # "40 KB", read strictly
MEMORY_TOKENS = 500
RELAYED = ("socketio", "sse")

Run = dict[str, Any]


def find(runs: list[Run], answers: int, viewers: int, rate: float, mode: str) -> Run | None:
    for run in runs:
        if (run["answers"], run["viewers"], run["rate"], run["mode"]) == (
            answers,
            viewers,
            rate,
            mode,
        ):
            return run
    return None


def _verdict(name: str, target: str, status: str, measured: str, note: str = "") -> dict[str, str]:
    return {"name": name, "target": target, "status": status, "measured": measured, "note": note}


def _p(run: Run, key: str) -> float:
    return float(run["latency_ms"].get(key, float("inf")))


def overhead(runs: list[Run], layout: str = "") -> list[dict[str, str]]:
    out = []
    direct = find(runs, 100, 1, 20.0, "direct")
    for mode in RELAYED:
        name = f"relay overhead over direct, 100 answers x 20/s, {mode}{layout}"
        target = f"p50 <= {OVERHEAD_P50_MS:g} ms and p99 <= {OVERHEAD_P99_MS:g} ms over direct"
        run = find(runs, 100, 1, 20.0, mode)
        if run is None or direct is None:
            out.append(_verdict(name, target, "NOT RUN", "-"))
            continue
        o50, o99 = _p(run, "p50") - _p(direct, "p50"), _p(run, "p99") - _p(direct, "p99")
        ok = o50 <= OVERHEAD_P50_MS and o99 <= OVERHEAD_P99_MS and run["complete"]
        measured = f"p50 +{o50:.2f} ms, p99 +{o99:.2f} ms" + ("" if run["complete"] else ", lost")
        out.append(_verdict(name, target, "PASS" if ok else "FAIL", measured))
    return out


def scale(runs: list[Run]) -> list[dict[str, str]]:
    out = []
    for mode in RELAYED:
        name = f"1,000 answers x 20/s through one gateway + one worker, {mode}"
        target = f"p99 <= {SCALE_P99_MS:g} ms, every chunk delivered"
        run = find(runs, 1000, 1, 20.0, mode)
        if run is None:
            out.append(_verdict(name, target, "NOT RUN", "-"))
            continue
        p99 = _p(run, "p99")
        ok = p99 <= SCALE_P99_MS and run["complete"]
        measured = (
            f"p99 {p99:.1f} ms, {run['chunks_per_s']:.0f} chunks/s, "
            f"{run['deliveries']}/{run['expected_deliveries']} delivered"
        )
        out.append(_verdict(name, target, "PASS" if ok else "FAIL", measured))
    return out


def connections(runs: list[Run], checks: list[Run]) -> dict[str, str]:
    name = "Redis connections per gateway process, 1 viewer vs 10,000"
    target = "the same count"
    relayed = [r for r in [*runs, *checks] if r["mode"] in RELAYED]
    if not relayed:
        return _verdict(name, target, "NOT RUN", "-")
    seen = [r for r in relayed if r["redis_connections"]["viewers_max"] > 0]
    if not seen:
        return _verdict(name, target, "NOT RUN", "-", "no viewer was seen by the sampler")
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
        return _verdict(name, target, "NOT RUN", measured, "no run reached 10,000 viewers")
    return _verdict(name, target, "PASS" if len(counts) == 1 else "FAIL", measured)


def memory(figures: dict[str, Any] | None) -> dict[str, str]:
    name = "Redis memory per finished 500-token answer, gone after retention"
    target = f"<= {MEMORY_BYTES:,} bytes (stream + record), then 0"
    if not figures or figures.get("tokens") != MEMORY_TOKENS:
        return _verdict(name, target, "NOT RUN", "-")
    total = figures["total_bytes"]
    gone = figures["gone_after_s"]
    ok = total <= MEMORY_BYTES and gone is not None
    measured = (
        f"{total:,} bytes ({figures['stream_bytes']:,} stream + {figures['record_bytes']:,} "
        f"record); TTL {figures['ttl_s_when_finished']} s when it ended (retention "
        f"{figures['retention_s']} s); "
        + (f"both keys gone when checked {gone:g} s later" if gone is not None else "NOT gone")
    )
    return _verdict(name, target, "PASS" if ok else "FAIL", measured)


def cpu_printed(runs: list[Run]) -> dict[str, str]:
    name = "CPU per chunk, from each process's own accounting, for every run"
    target = "gateway us per delivery and worker us per chunk written, printed"
    relayed = [r for r in runs if r["mode"] in RELAYED]
    if not relayed:
        return _verdict(name, target, "NOT RUN", "-")
    per = [r["cpu_us_per_chunk"] for r in relayed]
    ok = all(p["gateway_per_delivery"] is not None and p["worker_per_written"] for p in per)
    gw = [p["gateway_per_delivery"] for p in per if p["gateway_per_delivery"] is not None]
    wk = [p["worker_per_written"] for p in per if p["worker_per_written"] is not None]
    measured = (
        f"gateway {min(gw):.0f}-{max(gw):.0f} us/delivery, "
        f"worker {min(wk):.0f}-{max(wk):.0f} us/chunk over {len(relayed)} runs"
        if gw and wk
        else "-"
    )
    return _verdict(name, target, "PASS" if ok else "FAIL", measured)


def evaluate(
    runs: list[Run],
    memory_figures: dict[str, Any] | None,
    checks: list[Run] | None = None,
    serve_runs: list[Run] | None = None,
) -> list[dict[str, str]]:
    """`runs`: the sweep, on the split layout (gateway + worker); `checks`: runs outside it
    (the 10,000-viewer connection check); `serve_runs`: the default `serve` layout's."""
    return [
        *overhead(runs),
        *overhead(serve_runs or [], ", default serve"),
        *scale(runs),
        connections(runs, checks or []),
        memory(memory_figures),
        cpu_printed(runs),
    ]
