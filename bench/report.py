"""Showing a sweep: a table on the terminal, Markdown for docs/performance.md, a PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Run = dict[str, Any]

COLUMNS = (
    ("layout", 7),
    ("answers", 7),
    ("view", 4),
    ("rate", 5),
    ("tok", 4),
    ("mode", 8),
    ("p50 ms", 8),
    ("p99 ms", 8),
    ("max ms", 8),
    ("ttfc50", 7),
    ("w99", 6),
    ("g99", 6),
    ("chunks/s", 9),
    ("gw us", 6),
    ("wk us", 6),
    ("rd us", 6),
    ("all us", 6),
    ("conns", 5),
    ("ok", 3),
)


def _rate(rate: float) -> str:
    return f"{rate:g}" if rate else "max"


def every_run(result: dict[str, Any]) -> list[Run]:
    """The sweep's runs, then the `serve` layout's and the cluster's."""
    return [*result["runs"], *result.get("serve_runs", []), *result.get("cluster_runs", [])]


def cell_name(run: Run) -> str:
    burst = ":burst" if run.get("burst") else ""
    return f"{run['answers']}x{run['viewers']}@{_rate(run['rate'])}{burst}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def row(run: Run) -> list[str]:
    lat, ttfc, cpu = run["latency_ms"], run["ttfc_ms"], run["cpu_us_per_chunk"]
    hops = run.get("hops_ms")
    return [
        run.get("layout", "split"),
        str(run["answers"]) + ("!" if run.get("burst") else ""),
        str(run["viewers"]),
        _rate(run["rate"]),
        str(run["tokens"]),
        run["mode"],
        _num(lat.get("p50"), 2),
        _num(lat.get("p99"), 2),
        _num(lat.get("max"), 1),
        _num(ttfc.get("p50"), 0),
        _num(hops["model_to_redis"].get("p99"), 0) if hops else "-",
        _num(hops["redis_to_client"].get("p99"), 0) if hops else "-",
        f"{run['chunks_per_s']:.0f}",
        _num(cpu["gateway_per_delivery"], 0),
        _num(cpu["worker_per_written"], 0),
        _num(cpu["valkey_per_written"], 0),
        _num(cpu.get("tokenrelay_per_delivery"), 0),
        str(run["redis_connections"]["gateway_max"]) if run["mode"] != "direct" else "-",
        "yes" if run["complete"] else "NO",
    ]


def header() -> str:
    return "  ".join(name.rjust(width) for name, width in COLUMNS)


def line(run: Run) -> str:
    return "  ".join(cell.rjust(width) for cell, (_, width) in zip(row(run), COLUMNS, strict=True))


def targets_text(targets: list[dict[str, str]]) -> str:
    """One line per target and layout: status, what was measured, the target."""
    lines = ["targets, from this run's figures (answers marked ! were all asked at once):"]
    for t in targets:
        note = f" ({t['note']})" if t.get("note") else ""
        layout = f"{t.get('layout') or '-':<6}"
        lines.append(
            f"[{t['status']}] {layout} {t['name']}: {t['measured']} — target {t['target']}{note}"
        )
    return "\n".join(lines)


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def cluster_text(result: dict[str, Any]) -> str:
    """Each cluster run beside the same cell and transport on one node (the split layout,
    same gateway + worker processes): chunks/s and CPU per chunk, Valkey per node."""
    single = {(cell_name(r), r["mode"]): r for r in result["runs"]}
    lines = [
        "cluster (3 masters + replicas) beside one node, same cell and transport; us per chunk",
        "cell                 mode      chunks/s one|cluster  worker one|cluster  "
        "gateway one|cluster  valkey one|cluster(sum)  valkey per node",
    ]
    for run in result.get("cluster_runs", []):
        if run["mode"] == "direct":
            continue
        one = single.get((cell_name(run), run["mode"]))
        cpu = run["cpu_us_per_chunk"]
        base = one["cpu_us_per_chunk"] if one else {}
        nodes = cpu.get("valkey_nodes_per_written") or {}
        per_node = " ".join(f"{n.removeprefix('valkey:')} {_us(v)}" for n, v in nodes.items())
        rate = f"{one['chunks_per_s']:.0f}" if one else "-"
        lines.append(
            f"{cell_name(run):<20} {run['mode']:<9} "
            f"{rate:>8}|{run['chunks_per_s']:<8.0f}      "
            f"{_us(base.get('worker_per_written')):>5}|{_us(cpu['worker_per_written']):<5}       "
            f"{_us(base.get('gateway_per_delivery')):>5}|{_us(cpu['gateway_per_delivery']):<5}"
            f"        {_us(base.get('valkey_per_written')):>5}|"
            f"{_us(cpu['valkey_per_written']):<5}            {per_node}"
        )
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """The run table and the targets, as Markdown."""
    heads = [
        "layout",
        "answers",
        "viewers",
        "tokens/s",
        "tokens",
        "transport",
        "p50 ms",
        "p99 ms",
        "max ms",
        "first chunk p50 ms",
        "model→Redis p99 ms",
        "Redis→client p99 ms",
        "chunks/s",
        "gateway µs/delivery",
        "worker µs/chunk",
        "valkey µs/chunk",
        "tokenrelay µs/delivery (all its processes)",
        "gateway Redis conns",
        "all delivered",
    ]
    out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    out += ["| " + " | ".join(row(run)) + " |" for run in every_run(result)]
    out += ["", targets_markdown(result["targets"])]
    return "\n".join(out)


def targets_markdown(targets: list[dict[str, str]]) -> str:
    out = ["| layout | target | measured | result |", "|---|---|---|---|"]
    for t in targets:
        note = f" ({t['note']})" if t.get("note") else ""
        out.append(
            f"| {t.get('layout') or '-'} | {t['name']}: {t['target']} | {t['measured']}{note} "
            f"| **{t['status']}** |"
        )
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Latency percentiles against concurrency, one panel per token rate. None without
    matplotlib. Colour: transport; marker: viewers per answer; solid p50, dashed p99."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return None
    # Ramped runs only: a burst cell repeats a concurrency with another start.
    runs: list[Run] = [r for r in result["runs"] if not r.get("burst")]
    rates = sorted({r["rate"] for r in runs}, reverse=True)
    fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 4.6), squeeze=False)
    colours = {"direct": "#555555", "socketio": "#1f77b4", "sse": "#d62728"}
    markers = {1: "o", 10: "s"}
    for ax, rate in zip(axes[0], rates, strict=True):
        for mode, colour in colours.items():
            for viewers, marker in markers.items():
                pts = sorted(
                    (r["answers"], r["latency_ms"])
                    for r in runs
                    if r["rate"] == rate and r["mode"] == mode and r["viewers"] == viewers
                    and r["latency_ms"].get("count")
                )  # fmt: skip
                xs = [a for a, _ in pts]
                for key, style in (("p50", "-"), ("p99", "--")):
                    ys = [lat[key] for _, lat in pts]
                    ax.plot(xs, ys, marker=marker, color=colour, linestyle=style,
                            alpha=1.0 if viewers == 1 else 0.5, markersize=4)  # fmt: skip
        if rate:
            ax.axhline(50, color="#2ca02c", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent answers")
        ax.set_ylabel("chunk latency, model send -> client (ms)")
        ax.set_title(f"{_rate(rate)} tokens/s per answer" if rate else "unthrottled")
        ax.grid(True, which="both", linewidth=0.3)
    legend = [Line2D([], [], color=c, label=m) for m, c in colours.items()]
    legend += [Line2D([], [], color="black", marker=mk, linestyle="", label=f"{v} viewer"
                      + ("s" if v > 1 else "")) for v, mk in markers.items()]  # fmt: skip
    legend += [
        Line2D([], [], color="black", linestyle="-", label="p50"),
        Line2D([], [], color="black", linestyle="--", label="p99"),
        Line2D([], [], color="#2ca02c", linestyle=":", label="p99 target (1,000 x 20/s)"),
    ]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=7, frameon=False)
    machine = result["machine"]
    fig.suptitle(
        f"tokenrelay chunk latency, {result['name']} sweep ({machine['cpu']}, "
        f"{machine['cores']} cores, shared)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
