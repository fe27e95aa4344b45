"""The benchmark: tokenrelay against a direct stream from the same mock model, measured
at the clients, on real processes. Run it with `tokenrelay-bench` or `make bench`."""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    # Imported when called: `python -m tokenrelay.bench.clients` must not load the harness.
    from tokenrelay.bench.harness import main as harness_main

    return harness_main(argv)
