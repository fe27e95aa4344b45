"""The `tokenrelay` command: serve (gateway + workers), worker (workers alone), and the
client commands ask, watch and history (cli_client)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from tokenrelay import logs, metrics
from tokenrelay.cli_client import COMMANDS as CLIENT_COMMANDS
from tokenrelay.cli_client import add_commands as add_client_commands
from tokenrelay.cli_client import run as run_client
from tokenrelay.errors import TokenRelayError
from tokenrelay.settings import Settings, load_settings

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
        help="run the gateway (web page, Socket.IO, HTTP/SSE) with in-process workers",
        description="Run the gateway: the web page at /, Socket.IO, the HTTP API and SSE "
        "(OpenAPI at /docs), plus TOKENRELAY_WORKERS in-process workers.",
    )
    serve.add_argument("--host", help="bind address (TOKENRELAY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (TOKENRELAY_PORT, default 8000)")
    serve.add_argument(
        "--workers", type=int, help="in-process workers; 0 for a gateway only (TOKENRELAY_WORKERS)"
    )

    worker = sub.add_parser(
        "worker",
        help="run workers only (scale them as separate processes)",
        description="Answer questions from the request stream through the consumer group, "
        "with TOKENRELAY_WORKER_CONCURRENCY answers at once.",
    )
    worker.add_argument(
        "--concurrency",
        type=int,
        help="answers at once (TOKENRELAY_WORKER_CONCURRENCY, default 64)",
    )
    add_client_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, object] = {}
    for flag, field in (
        ("host", "host"),
        ("port", "port"),
        ("workers", "workers"),
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
            return _serve(settings)
        return asyncio.run(_work(settings))
    except TokenRelayError as e:
        print(f"tokenrelay: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _serve(settings: Settings) -> int:
    import uvicorn

    from tokenrelay.gateway import create_app
    from tokenrelay.providers.select import resolve_provider_name

    if settings.workers:
        resolve_provider_name(settings)  # fail now, in one line, when no model is usable
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        lifespan="on",
        timeout_graceful_shutdown=int(settings.grace_period_s),
        # JSON logs: uvicorn's loggers propagate to our one JSON handler instead of their own.
        log_config=None if settings.log_json else uvicorn.config.LOGGING_CONFIG,
    )
    server = uvicorn.Server(config)
    print(
        f"tokenrelay: open http://{settings.host}:{settings.port}/ (API docs at /docs)", flush=True
    )
    server.run()
    return 0 if server.started else 1


async def _work(settings: Settings) -> int:
    from tokenrelay.services import open_services

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with open_services(settings, gateway=False, workers=1) as services:
        worker = services.workers[0]
        print(
            f"tokenrelay: worker {worker.name} answering with "
            f"{services.provider.name if services.provider else '?'}",
            flush=True,
        )
        stop_metrics = metrics.serve(settings.host, settings.metrics_port)
        try:
            await stop.wait()
        finally:
            stop_metrics()
    return 0


if __name__ == "__main__":
    sys.exit(main())
