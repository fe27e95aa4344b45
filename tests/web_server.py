"""Real processes for the browser tests: `tokenrelay serve` with its embedded Valkey, and
the mock model, as sync context managers over the one harness (tests/support/procs.py).

Each runs on a free port, in its own directory (so no `.env` of the developer's is read,
and with its own data directory), and is waited for until it answers HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from tests.support.net import free_port
from tests.support.procs import Cluster, Proc, blocking

__all__ = ["ServerProcess", "free_port", "mock_model", "serve"]

ServerProcess = Proc


@contextmanager
def serve(workdir: Path, env: Mapping[str, str], *, port: int | None = None) -> Iterator[Proc]:
    """`tokenrelay serve` with its own embedded Valkey whose data lives in `workdir`."""
    cluster = Cluster(workdir, settings=dict(env))
    try:
        yield blocking(cluster.serve(workers=None, embedded=True, port=port))
    finally:
        cluster.stop()


@contextmanager
def mock_model(workdir: Path) -> Iterator[Proc]:
    """The mock model (`python -m tokenrelay.testing.mockllm`); its `url` is the origin
    (the browser tests add /v1)."""
    cluster = Cluster(workdir)
    try:
        proc = blocking(cluster.mock("mockllm"))
        proc.url = proc.url.removesuffix("/v1")
        yield proc
    finally:
        cluster.stop()
