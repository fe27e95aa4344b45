"""One supervised child process: started, watched, restarted with backoff, reported.

A child dies with the supervisor (PR_SET_PDEATHSIG), so a SIGKILLed `serve` leaves no
orphan. A worker child writes a byte to its heartbeat pipe every second from its event
loop; a child whose loop stops beating (native code holding it, a blocking call) past
its limit is killed and replaced like one that crashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenrelay.embedded import die_with_parent

log = logging.getLogger(__name__)

# A child that lived shorter than this died "fast": the next start waits longer.
FAST_DEATH_S = 10.0
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 30.0
EXIT_WEDGED = 75  # a worker whose model ignored a stop (see worker.loop.WEDGED_AFTER_S)


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    if returncode == EXIT_WEDGED:
        return "model stuck (ignored a stop)"
    return f"exited with status {returncode}"


@dataclass
class Status:
    """What /healthz and /metrics show of a child."""

    name: str
    kind: str  # gateway, worker or valkey
    pid: int = 0
    state: str = "starting"  # starting, running, backoff, stopped
    restarts: int = 0
    last_exit: str = ""
    since: float = field(default_factory=time.time)

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "pid": self.pid or None,
            "state": self.state,
            "restarts": self.restarts,
            "last_exit": self.last_exit or None,
            "since": round(self.since, 3),
        }


class Child:
    """A Python child (gateway or worker) kept running until `stop()`."""

    def __init__(
        self,
        status: Status,
        argv: Callable[[int | None], Sequence[str]],
        *,
        env: dict[str, str],
        pass_fds: Sequence[int] = (),
        heartbeat_limit_s: float | None = None,
        on_change: Callable[[], None],
        on_death: Callable[[Child, int], Awaitable[None]] | None = None,
    ) -> None:
        self.status = status
        self._argv = argv  # given the heartbeat fd (or None), the command line
        self._env = env
        self._pass_fds = tuple(pass_fds)
        self._heartbeat_limit_s = heartbeat_limit_s
        self._on_change = on_change
        self._on_death = on_death
        self._process: asyncio.subprocess.Process | None = None
        self._beat = 0.0
        self._stopping = False
        self._fast_deaths = 0
        self._kill_reason = ""
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self._process.pid if self._process and self._process.returncode is None else 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep(), name=f"keep-{self.status.name}")

    def signal(self, sig: int) -> None:
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(sig)

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`. Safe to call twice."""
        self._stopping = True
        self.signal(signal.SIGTERM)
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                log.warning("%s did not stop within %gs; killing it", self.status.name, timeout_s)
                self.signal(signal.SIGKILL)
                await self._task
        self._set(state="stopped", pid=0)

    async def _keep(self) -> None:
        while not self._stopping:
            started = time.monotonic()
            returncode = await self._run_once()
            if self._stopping:
                return
            reason, self._kill_reason = self._kill_reason or exit_reason(returncode), ""
            lived_s = time.monotonic() - started
            self._fast_deaths = self._fast_deaths + 1 if lived_s < FAST_DEATH_S else 0
            delay_s = 0.0
            if self._fast_deaths:
                delay_s = min(BACKOFF_FIRST_S * 2 ** (self._fast_deaths - 1), BACKOFF_MAX_S)
            log.error(
                "%s (pid %d) %s after %.1fs; restarting%s",
                self.status.name,
                self.status.pid,
                reason,
                lived_s,
                f" in {delay_s:.2f}s ({self._fast_deaths} quick deaths in a row)"
                if delay_s
                else "",
            )
            self._set(state="backoff", pid=0, last_exit=reason, restarts=self.status.restarts + 1)
            if self._on_death is not None:
                await self._on_death(self, returncode)
            await asyncio.sleep(delay_s)

    async def _run_once(self) -> int:
        read_fd = write_fd = None
        if self._heartbeat_limit_s is not None:
            read_fd, write_fd = os.pipe()
            os.set_blocking(read_fd, False)
        fds = (*self._pass_fds, *(() if write_fd is None else (write_fd,)))
        self._process = await asyncio.create_subprocess_exec(
            *self._argv(write_fd),
            env=self._env,
            stdin=asyncio.subprocess.DEVNULL,
            pass_fds=fds,
            preexec_fn=die_with_parent,
        )
        self._set(state="running", pid=self._process.pid, since=time.time())
        if write_fd is not None:
            os.close(write_fd)
        watch = None
        if read_fd is not None:
            watch = asyncio.create_task(self._watch_heartbeat(read_fd))
        try:
            return await self._process.wait()
        finally:
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
            if read_fd is not None:
                asyncio.get_running_loop().remove_reader(read_fd)
                os.close(read_fd)

    async def _watch_heartbeat(self, read_fd: int) -> None:
        """Kill the child when its event loop has not beaten for the limit."""
        assert self._heartbeat_limit_s is not None
        loop = asyncio.get_running_loop()
        self._beat = time.monotonic()

        def beat() -> None:
            try:
                data = os.read(read_fd, 4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if data:
                self._beat = time.monotonic()
            else:  # the child closed its end: it is exiting
                loop.remove_reader(read_fd)

        loop.add_reader(read_fd, beat)
        while True:
            await asyncio.sleep(1.0)
            silent_s = time.monotonic() - self._beat
            if silent_s > self._heartbeat_limit_s and not self._stopping:
                log.error(
                    "%s (pid %d): no heartbeat for %.0fs (stuck); killing it",
                    self.status.name,
                    self.status.pid,
                    silent_s,
                )
                self._kill_reason = f"stuck: no heartbeat for {silent_s:.0f}s"
                self.signal(signal.SIGKILL)
                return

    def _set(self, **changes: Any) -> None:
        for name, value in changes.items():
            setattr(self.status, name, value)
        self._on_change()


def read_state(path: Path | None) -> list[dict[str, object]]:
    """The supervisor's children, for a gateway it started ([] when there is none)."""
    if path is None:
        return []
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    processes = body.get("processes", []) if isinstance(body, dict) else []
    return [p for p in processes if isinstance(p, dict)]
