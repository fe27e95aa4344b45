"""The `tokenrelay` command: serve (the supervisor of everything), gateway and worker (one
process each), and the client commands ask, watch and history (cli_client)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from tokenrelay import logs, metrics
from tokenrelay.cli_client import COMMANDS as CLIENT_COMMANDS
from tokenrelay.cli_client import add_commands as add_client_commands
from tokenrelay.cli_client import run as run_client
from tokenrelay.errors import TokenRelayError
from tokenrelay.settings import Settings, load_settings

# A worker's stop: the grace period for its answers, then this long for the rest of the
# clean-up (releasing requests, closing connections) before it exits regardless.
SHUTDOWN_MARGIN_S = 20.0
EXIT_STOP_OVERRAN = 70

DESCRIPTION = """\
tokenrelay streams LLM answers to browsers and programs through Redis Streams.
Settings come from the environment or a .env file (REDIS_URL, OPENAI_API_KEY,
OPENAI_BASE_URL, OPENAI_MODEL, TOKENRELAY_*); see README.md for the full table.
With no REDIS_URL, an embedded Valkey keeps its data in TOKENRELAY_DATA_DIR."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenrelay",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run everything: the gateway, worker processes and (with no REDIS_URL) Valkey",
        description="Supervise the gateway (the web page at /, Socket.IO, the HTTP API and SSE; "
        "OpenAPI at /docs), TOKENRELAY_WORKER_PROCESSES worker processes and, with no "
        "REDIS_URL, the embedded Valkey. A child that dies is restarted with backoff; a dead "
        "worker's answers are reclaimed at once by the live ones.",
    )
    serve.add_argument("--host", help="bind address (TOKENRELAY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (TOKENRELAY_PORT, default 8000)")
    serve.add_argument(
        "--workers",
        type=_processes,
        help="worker processes: a number, or auto (one per core); 0 for a gateway only "
        "(TOKENRELAY_WORKER_PROCESSES, default auto)",
    )

    gateway = sub.add_parser(
        "gateway",
        help="run one gateway process alone (workers run elsewhere)",
        description="Serve the web page, Socket.IO, the HTTP API and SSE, with no worker: "
        "questions are answered by `tokenrelay worker` processes on the same Redis.",
    )
    gateway.add_argument("--host", help="bind address (TOKENRELAY_HOST, default 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="port (TOKENRELAY_PORT, default 8000)")
    # Set by `serve`: the listening socket it bound, and where it writes its children's state.
    gateway.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    gateway.add_argument("--state-file", type=Path, help=argparse.SUPPRESS)

    worker = sub.add_parser(
        "worker",
        help="run one worker process (scale them as separate processes, on any host)",
        description="Answer questions from the request stream through the consumer group, "
        "with TOKENRELAY_WORKER_CONCURRENCY answers at once. SIGTERM lets answers finish "
        "within TOKENRELAY_GRACE_PERIOD_S and releases the rest to the other workers.",
    )
    worker.add_argument(
        "--concurrency",
        type=int,
        help="answers at once (TOKENRELAY_WORKER_CONCURRENCY, default 64)",
    )
    worker.add_argument("--name", help="consumer name in the group (default: host-pid-random)")
    # Set by `serve`: a pipe the worker writes to every second while its event loop runs.
    worker.add_argument("--heartbeat-fd", type=int, help=argparse.SUPPRESS)
    add_client_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, object] = {}
    for flag, field in (
        ("host", "host"),
        ("port", "port"),
        ("workers", "worker_processes"),
        ("concurrency", "worker_concurrency"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[field] = value
    try:
        settings = load_settings(**overrides)
        logs.configure(args.log_level, json=settings.log_json)
        if args.command in CLIENT_COMMANDS:
            return run_client(args, settings)
        if args.command == "serve":
            return _serve(settings, args.log_level)
        if args.command == "gateway":
            return _gateway(settings, args.fd, args.state_file)
        return _on_uvloop(_work(settings, args.name, args.heartbeat_fd))
    except TokenRelayError as e:
        print(f"tokenrelay: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _on_uvloop(main: Coroutine[Any, Any, int]) -> int:
    """Run a worker's `main` on uvloop where it is installed (as uvicorn runs the gateway):
    at 100 answers x 20 tokens/s a worker spent 70-89 us of CPU per chunk on it, 81-102 on
    asyncio's own loop (docs/performance.md); asyncio's loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _processes(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("a number of processes, or auto") from None
    if count < 0:
        raise argparse.ArgumentTypeError("0 or more")
    return count


def _serve(settings: Settings, log_level: str) -> int:
    from tokenrelay.providers.select import resolve_provider_name
    from tokenrelay.supervisor import serve

    if settings.worker_process_count:
        resolve_provider_name(settings)  # fail now, in one line, when no model is usable
    return serve(settings, log_level=log_level)


def _gateway(settings: Settings, fd: int | None, state_file: Path | None) -> int:
    import socket

    import uvicorn

    from tokenrelay.gateway import create_app
    from tokenrelay.gateway.server import uvicorn_options

    app = create_app(settings, supervisor_state=state_file, own_process=True)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        lifespan="on",
        timeout_graceful_shutdown=int(settings.grace_period_s),
        # Token-sized messages: deflate costs the client about twice the CPU and adds
        # 0.5-2 ms (measured, #13); socket.io-client and browsers offer it by default.
        ws_per_message_deflate=False,
        # JSON logs: uvicorn's loggers propagate to our one JSON handler instead of their own.
        log_config=None if settings.log_json else uvicorn.config.LOGGING_CONFIG,
        **uvicorn_options(settings),
    )
    server = uvicorn.Server(config)
    if fd is None:
        print(
            f"tokenrelay: open http://{settings.host}:{settings.port}/ (API docs at /docs)",
            flush=True,
        )
        server.run()
    else:
        server.run(sockets=[socket.socket(fileno=fd)])
    return 0 if server.started else 1


async def _work(settings: Settings, name: str | None, heartbeat_fd: int | None) -> int:
    from tokenrelay.children import EXIT_WEDGED
    from tokenrelay.services import open_services

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def wedged() -> None:
        # The model's thread cannot be stopped from Python: only a new process frees it.
        logging.shutdown()
        os._exit(EXIT_WEDGED)

    async with open_services(
        settings, gateway=False, workers=1, worker_name=name, on_wedged=wedged
    ) as services:
        worker = services.workers[0]
        loop.add_signal_handler(signal.SIGUSR1, worker.reclaim_soon)
        print(
            f"tokenrelay: worker {worker.name} answering with "
            f"{services.provider.name if services.provider else '?'}",
            flush=True,
        )
        stop_metrics = metrics.serve(settings.host, settings.metrics_port)
        beating = asyncio.create_task(_heartbeat(heartbeat_fd)) if heartbeat_fd else None
        # What start-up made (modules, clients, the model) lives as long as the process: the
        # collector need not scan it again and again (its scans were ~2% of a busy worker).
        gc.freeze()
        try:
            await stop.wait()
        finally:
            stop_metrics()
            if beating is not None:
                beating.cancel()
            _exit_after(settings.grace_period_s + SHUTDOWN_MARGIN_S)
    return 0


def _exit_after(deadline_s: float) -> None:
    """The hard deadline of a staged stop: whatever the clean-up still waits for (a Redis
    that is gone, a model that will not stop), the process exits by then. A thread, so a
    blocked event loop cannot hold it up; a clean stop exits long before it fires."""
    timer = threading.Timer(deadline_s, os._exit, args=(EXIT_STOP_OVERRAN,))
    timer.daemon = True
    timer.start()


async def _heartbeat(fd: int) -> None:
    """One byte a second to `serve` while this event loop runs: silence means stuck."""
    os.set_blocking(fd, False)
    while True:
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(fd, b".")
        await asyncio.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
