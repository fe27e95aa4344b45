"""Real processes for the browser tests: `tokenrelay serve` and the mock model server.

Each runs as a subprocess on a free port, in its own temporary directory (so no `.env`
of the developer's is read) and with its own data directory, and is waited for until
it answers HTTP.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0

# Settings of the developer's shell that would change what a test server does.
_SCRUBBED_PREFIXES = ("TOKENRELAY_", "OPENAI_", "REDIS_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A running subprocess that serves HTTP at `url`; its output goes to `log_path`."""

    name: str
    url: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S. Safe to call twice."""
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(STOP_TIMEOUT_S)


def _clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def start_process(
    name: str,
    args: list[str],
    *,
    workdir: Path,
    port: int,
    health_path: str,
    env: Mapping[str, str],
) -> ServerProcess:
    """Start `args` and wait until GET `health_path` answers 200; raise with its log if not."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            args,
            cwd=workdir,
            env=_clean_env(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    proc = ServerProcess(name, f"http://127.0.0.1:{port}", popen, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if popen.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {popen.returncode} before answering:\n{proc.log_tail()}"
            )
        try:
            if httpx.get(proc.url + health_path, timeout=2.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(
                f"{name} did not answer within {START_TIMEOUT_S} s:\n{proc.log_tail()}"
            )
        time.sleep(0.1)


@contextmanager
def serve(
    workdir: Path, env: Mapping[str, str], *, port: int | None = None
) -> Iterator[ServerProcess]:
    """`tokenrelay serve` with its own embedded Valkey whose data lives in `workdir`."""
    port = port or free_port()
    full_env = {"TOKENRELAY_DATA_DIR": str(workdir / "data"), **env}
    proc = start_process(
        "serve",
        [sys.executable, "-m", "tokenrelay", "serve", "--host", "127.0.0.1", "--port", str(port)],
        workdir=workdir,
        port=port,
        health_path="/healthz",
        env=full_env,
    )
    try:
        yield proc
    finally:
        proc.stop()


@contextmanager
def mock_model(workdir: Path) -> Iterator[ServerProcess]:
    """The mock model (`python -m tokenrelay.testing.mockllm`); its base URL ends in /v1."""
    port = free_port()
    proc = start_process(
        "mockllm",
        [
            sys.executable,
            "-m",
            "tokenrelay.testing.mockllm",
            "--host",
            "127.0.0.1",
            *("--port", str(port)),
        ],
        workdir=workdir,
        port=port,
        health_path="/v1/models",
        env={},
    )
    try:
        yield proc
    finally:
        proc.stop()
