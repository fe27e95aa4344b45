"""The benchmark: tokenrelay against a direct stream from the same mock model, measured
at the clients, on real processes. Not installed with tokenrelay: run it from the
repository root with `python -m bench` or `make bench` (its packages: the `[bench]` extra)."""

from pathlib import Path

__all__ = ["ROOT", "main"]

# The repository root: every benchmark process runs with it on its import path.
ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    # Imported when called: `python -m bench.clients` must not load the harness.
    from bench.harness import main as harness_main

    return harness_main(argv)
