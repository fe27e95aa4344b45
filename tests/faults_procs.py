"""The process harness under its older name; it lives in tests/support/procs.py."""

from tests.support.procs import (
    Cluster,
    Proc,
    clean_env,
    processes,
    processes_alive,
    redis_clients,
    wait_http,
    wait_log,
    wait_processes,
)

__all__ = [
    "Cluster",
    "Proc",
    "clean_env",
    "processes",
    "processes_alive",
    "redis_clients",
    "wait_http",
    "wait_log",
    "wait_processes",
]
