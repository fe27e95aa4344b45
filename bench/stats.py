"""Percentiles over the clients' raw latency files."""

from __future__ import annotations

import statistics
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def read_ns(paths: Iterable[Path]) -> list[int]:
    values = array("q")
    for path in paths:
        if path.exists():
            with path.open("rb") as f:
                values.frombytes(f.read())
    return sorted(values)


def percentile(ordered: Sequence[int], p: float) -> int:
    """Nearest-rank percentile of already sorted values."""
    if not ordered:
        return 0
    rank = max(1, -(-len(ordered) * p // 100))  # ceil, without floats going astray
    return ordered[min(len(ordered), int(rank)) - 1]


def summary_ms(ordered: Sequence[int]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean in milliseconds, and the count."""
    if not ordered:
        return {"count": 0}
    out: dict[str, float] = {"count": len(ordered)}
    for p in PERCENTILES:
        out[f"p{p:g}"] = round(percentile(ordered, p) / 1e6, 3)
    out["max"] = round(ordered[-1] / 1e6, 3)
    out["mean"] = round(sum(ordered) / len(ordered) / 1e6, 3)
    return out


def medians_table(title: str, results: dict[str, list[float]], unit: str = "us") -> str:
    """`title`, then per way its median over the rounds and the rounds' spread."""
    width = max((len(name) for name in results), default=0)
    lines = [title]
    for name, per in results.items():
        spread = f"{min(per):.2f}-{max(per):.2f}"
        lines.append(f"  {name:<{width}}  {statistics.median(per):7.2f} {unit}  (rounds: {spread})")
    return "\n".join(lines)
