"""What `tokenrelay serve` is: a small supervisor of the embedded Valkey, the gateway and
the worker processes.

    serve (this module: no model, no viewers)
      ├── valkey-server        embedded, unless REDIS_URL is set; restarted from its AOF
      ├── tokenrelay gateway   web page, Socket.IO, HTTP/SSE on the socket serve bound
      └── tokenrelay worker xN the only processes that call the model

The listening socket belongs to the supervisor and is inherited by each gateway
process, so a restarted gateway takes over the same port with no gap in which
connections are refused. When a worker dies, its pending requests are released at
once (made claimable) and the live workers are told to reclaim them now; the
replacement starts with backoff. A stop never deletes a consumer with pending work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

from redis.exceptions import RedisError

from tokenrelay.children import Child, Status
from tokenrelay.embedded import EmbeddedValkey
from tokenrelay.services import make_store, redis_client
from tokenrelay.settings import Settings
from tokenrelay.store import Store

log = logging.getLogger(__name__)

HEARTBEAT_MARGIN_S = 5.0
STOP_MARGIN_S = 10.0
RETIRE_EVERY_S = 10.0


def bind(host: str, port: int) -> socket.socket:
    """The gateway's listening socket, bound here so it outlives any one gateway process."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, settings: Settings, *, log_level: str = "info") -> None:
        self.settings = settings
        self._log_level = log_level
        self._embedded: EmbeddedValkey | None = None
        self._valkey_status = Status("valkey", "valkey")
        self._children: list[Child] = []
        self._workers: list[Child] = []
        self._consumers: dict[Child, str] = {}
        self._retired: set[str] = set()  # consumers of dead workers, deleted once idle
        self._store: Store | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self.state_file = settings.data_dir / f"serve-{os.getpid()}.json"
        self.url = ""

    async def run(self, sock: socket.socket) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        redis_url = await self._redis_url()
        redis = redis_client(self.settings, redis_url, size=2, name="tokenrelay-supervisor")
        try:
            self._store = make_store(self.settings, redis)
            await self._store.ensure_group()
            self._start_children(redis_url, sock)
            watchers = [asyncio.create_task(self._retire_loop())]
            if self._embedded is not None and self._embedded.process is not None:
                watchers.append(asyncio.create_task(self._keep_valkey()))
            await self._stop.wait()
            log.info("serve: stopping")
            await self._shutdown(watchers)
        finally:
            await redis.aclose(close_connection_pool=True)
            if self._embedded is not None:
                await asyncio.to_thread(self._embedded.stop)
            self.state_file.unlink(missing_ok=True)
        return 0

    # -- starting -----------------------------------------------------------

    async def _redis_url(self) -> str:
        if self.settings.redis_url:
            return self.settings.redis_url
        self._embedded = EmbeddedValkey(
            self.settings.data_dir, maxmemory=self.settings.embedded_maxmemory
        )
        url = await asyncio.to_thread(self._embedded.start)
        process = self._embedded.process
        self._valkey_status.pid = process.pid if process else 0
        self._valkey_status.state = "running" if process else "adopted"
        return url

    def _start_children(self, redis_url: str, sock: socket.socket) -> None:
        env = {**os.environ, "REDIS_URL": redis_url}
        fd = sock.fileno()

        def gateway_argv(_: int | None) -> Sequence[str]:
            return [
                *self._python(),
                "gateway",
                "--fd",
                str(fd),
                "--state-file",
                str(self.state_file),
            ]

        gateway = Child(
            Status("gateway", "gateway"),
            gateway_argv,
            env=env,
            pass_fds=[fd],
            on_change=self._write_state,
        )
        self._children.append(gateway)
        for index in range(self.settings.worker_process_count):
            self._children.append(self._worker_child(index, env))
        self._write_state()
        for child in self._children:
            child.start()

    def _worker_child(self, index: int, env: dict[str, str]) -> Child:
        host = socket.gethostname()

        def worker_argv(heartbeat_fd: int | None) -> Sequence[str]:
            # A fresh consumer name per process: a replacement never inherits a dead one's
            # identity; the dead one's requests are released and it is deleted once idle.
            previous = self._consumers.get(child)
            if previous:
                self._retired.add(previous)
            name = f"{host}-serve{os.getpid()}-w{index}-{os.urandom(3).hex()}"
            self._consumers[child] = name
            return [
                *self._python(),
                "worker",
                "--name",
                name,
                "--heartbeat-fd",
                str(heartbeat_fd),
            ]

        child = Child(
            Status(f"worker-{index}", "worker"),
            worker_argv,
            env=env,
            heartbeat_limit_s=self.settings.stall_timeout_s + HEARTBEAT_MARGIN_S,
            on_change=self._write_state,
            on_death=self._worker_died,
        )
        self._workers.append(child)
        return child

    def _python(self) -> list[str]:
        return [sys.executable, "-m", "tokenrelay", "--log-level", self._log_level]

    # -- when things die ------------------------------------------------------

    async def _worker_died(self, child: Child, _: int) -> None:
        """Its requests become claimable now, and the live workers reclaim them now."""
        name = self._consumers.get(child, "")
        if not name or self._store is None:
            return
        for attempt in range(5):
            try:
                released = await self._store.group.release(name)
                break
            except RedisError as e:
                log.warning("serve: could not release %s's requests (%s); retrying", name, e)
                await asyncio.sleep(0.2 * (attempt + 1))
        else:
            return  # they are reclaimed after TOKENRELAY_RECLAIM_IDLE_MS instead
        if released:
            log.warning("serve: released %d requests of %s to the live workers", released, name)
            for other in self._workers:
                if other is not child:
                    other.signal(signal.SIGUSR1)

    async def _retire_loop(self) -> None:
        """Delete dead workers' consumers once nothing is pending for them."""
        while True:
            await asyncio.sleep(RETIRE_EVERY_S)
            await self._retire()

    async def _retire(self) -> None:
        if self._store is None:
            return
        for name in list(self._retired):
            with contextlib.suppress(RedisError):
                if await self._store.group.forget(name):
                    self._retired.discard(name)

    async def _keep_valkey(self) -> None:
        """Restart the embedded Valkey from its AOF if it dies while serve runs."""
        embedded = self._embedded
        assert embedded is not None
        while True:
            process = embedded.process
            if process is None:
                return
            returncode = await asyncio.to_thread(process.wait)
            if self._stopping:
                return
            status = self._valkey_status
            status.last_exit, status.restarts = (
                f"exited with status {returncode}",
                status.restarts + 1,
            )
            status.state, status.pid = "backoff", 0
            log.error("serve: the embedded Valkey died (%s); restarting it", status.last_exit)
            self._write_state()
            await asyncio.sleep(0.2)
            try:
                await asyncio.to_thread(embedded.spawn)
            except Exception:
                log.exception("serve: the embedded Valkey did not restart; trying again")
                await asyncio.sleep(2.0)
                continue
            status.state = "running"
            status.pid = embedded.process.pid if embedded.process else 0
            self._write_state()

    # -- stopping ---------------------------------------------------------------

    async def _shutdown(self, watchers: list[asyncio.Task[None]]) -> None:
        self._stopping = True
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        timeout_s = self.settings.grace_period_s + STOP_MARGIN_S
        await asyncio.gather(*(child.stop(timeout_s) for child in self._children))
        if self._store is not None:
            # A worker that was killed could not release its own requests: do it for it.
            for name in self._consumers.values():
                with contextlib.suppress(RedisError):
                    await self._store.group.release(name)
                    self._retired.add(name)
            await self._retire()

    def _write_state(self) -> None:
        """The children as /healthz and /metrics of the gateway show them."""
        statuses = [child.status for child in self._children]
        if self._embedded is not None:
            statuses.insert(0, self._valkey_status)
        body = {"supervisor_pid": os.getpid(), "processes": [s.public() for s in statuses]}
        tmp = self.state_file.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(body))
            os.replace(tmp, self.state_file)


def serve(settings: Settings, *, log_level: str) -> int:
    """Bind, print where to open, supervise until SIGINT/SIGTERM."""
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"tokenrelay: open http://{shown}:{port}/ (API docs at /docs)", flush=True)
    try:
        return asyncio.run(Supervisor(settings, log_level=log_level).run(sock))
    finally:
        sock.close()
