"""What reading one streamed chunk from an OpenAI-compatible server costs a worker, by client.

Measures, in this process's own CPU time, the worker's real `openai` provider
(`OpenAIProvider.stream` on tokenrelay's own HTTP/1.1 client, and `OpenAIProvider.pump`,
the pushed read a worker runs per answer: `openai_provider_pushed`), the same provider
on the httpx client it had before (`openai_provider_httpx`, the baseline for that
client), the official `openai` SDK and two bare lean readers of the same server-sent
events (httpx and aiohttp, each parsing with orjson), with the mock model in another
process. The readers take turns, `--rounds` times over. Run it alone with
`python -m bench.sdkcost` (`--help` for streams, tokens, rates and readers).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import httpx
import openai
import orjson

from bench.httpx_lean import HttpxClient
from bench.loop import run
from tests.support.procs import Cluster
from tokenrelay.providers.base import Prompt
from tokenrelay.providers.h1pool import H1Client
from tokenrelay.providers.openai import NO_KEY, OpenAIProvider
from tokenrelay.settings import Settings
from tokenrelay.testing.mockllm import directive

Reader = Callable[[str], Awaitable[int]]


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _body(question: str) -> dict[str, Any]:
    return {
        "model": "mock-llm",
        "stream": True,
        "messages": [{"role": "user", "content": question}],
    }


def _count(events: list[bytes]) -> int:
    n = 0
    for event in events:
        if event.startswith(b"data: {"):
            choices = orjson.loads(event[6:]).get("choices")
            n += bool(choices and choices[0]["delta"].get("content"))
    return n


async def _ready() -> None:
    pass


async def _pushed(provider: OpenAIProvider, question: str) -> int:
    items: list[object] = []
    await provider.pump(Prompt("cost", question), items.append, _ready)
    return sum(isinstance(item, str) for item in items)


async def measure(
    base_url: str,
    streams: int,
    tokens: int,
    rate: float,
    only: list[str] | None = None,
    rounds: int = 1,
) -> dict[str, float | list[float]]:
    """CPU microseconds per content chunk for each reader, `streams` answers at once; with
    `rounds` above 1, a list: one figure per round, the readers taking turns."""
    question = f"cost {directive(tokens=tokens, rate=rate) if rate else directive(tokens=tokens)}"
    settings = Settings(
        _env_file=None,
        openai_api_key=None,
        openai_base_url=base_url,
        openai_model="mock-llm",
        worker_concurrency=streams,
    )
    provider = OpenAIProvider.from_settings(settings)
    headers = {
        "authorization": f"Bearer {NO_KEY}",
        "content-type": "application/json",
        "accept": "application/json",
        "user-agent": "tokenrelay",
    }
    on_httpx = OpenAIProvider(
        cast(H1Client, HttpxClient(headers, read_timeout_s=60.0, max_idle=streams)),
        base_url,
        "mock-llm",
        secret=None,
        max_retries=settings.provider_max_retries,
    )
    sdk = openai.AsyncOpenAI(api_key="unused", base_url=base_url, max_retries=0)
    hx = httpx.AsyncClient(base_url=base_url, timeout=60, limits=httpx.Limits(max_connections=None))
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def with_provider(q: str) -> int:
        return sum([isinstance(item, str) async for item in provider.stream(Prompt("cost", q))])

    async def with_provider_pushed(q: str) -> int:
        return await _pushed(provider, q)

    async def with_provider_on_httpx(q: str) -> int:
        return sum([isinstance(item, str) async for item in on_httpx.stream(Prompt("cost", q))])

    async def with_sdk(q: str) -> int:
        stream = await sdk.chat.completions.create(
            model="mock-llm", messages=[{"role": "user", "content": q}], stream=True
        )
        return sum([bool(c.choices and c.choices[0].delta.content) async for c in stream])

    async def with_httpx(q: str) -> int:
        n, rest = 0, b""
        async with hx.stream("POST", "/chat/completions", json=_body(q)) as resp:
            async for data in resp.aiter_raw():
                *events, rest = (rest + data).split(b"\n\n")
                n += _count(events)
        return n

    async def with_aiohttp(q: str) -> int:
        n, rest = 0, b""
        async with session.post(f"{base_url}/chat/completions", json=_body(q)) as resp:
            async for data in resp.content.iter_any():
                *events, rest = (rest + data).split(b"\n\n")
                n += _count(events)
        return n

    readers: dict[str, Reader] = {
        "openai_provider": with_provider,
        "openai_provider_pushed": with_provider_pushed,
        "openai_provider_httpx": with_provider_on_httpx,
        "openai_sdk": with_sdk,
        "httpx_orjson": with_httpx,
        "aiohttp_orjson": with_aiohttp,
    }
    chosen = {name: reader for name, reader in readers.items() if not only or name in only}
    runs: dict[str, list[float]] = {name: [] for name in chosen}
    try:
        for reader in chosen.values():
            await reader(question)  # warm: connections, imports, first-call costs
        for _ in range(rounds):  # in turns, so that a busy spell on the machine hits all
            for name, reader in chosen.items():
                before = _cpu_s()
                chunks = sum(await asyncio.gather(*(reader(question) for _ in range(streams))))
                runs[name].append(round((_cpu_s() - before) * 1e6 / max(1, chunks), 1))
    finally:
        await provider.aclose()
        await on_httpx.aclose()
        await sdk.close()
        await hx.aclose()
        await session.close()
    return {name: values[0] if rounds == 1 else values for name, values in runs.items()}


async def _main(
    streams: int, tokens: int, rates: list[float], only: list[str] | None = None, rounds: int = 1
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-sdkcost-"))
    try:
        async with Cluster(workdir) as cluster:
            mock = await cluster.mock()
            results: dict[str, Any] = {"streams": streams, "tokens": tokens}
            for rate in rates:
                label = f"{rate:g}/s" if rate else "unthrottled"
                results[label] = await measure(mock.url, streams, tokens, rate, only, rounds)
            return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def provider_read_cost(streams: int = 50, tokens: int = 60) -> dict[str, Any]:
    """Per-chunk CPU of each reader at 20 tokens/s and unthrottled (a fresh event loop)."""
    return run(_main(streams, tokens, [20.0, 0.0]))


async def provider_read_cost_async(streams: int = 50, tokens: int = 60) -> dict[str, Any]:
    return await _main(streams, tokens, [20.0, 0.0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=50, help="answers read at once")
    parser.add_argument("--tokens", type=int, default=60, help="content chunks per answer")
    parser.add_argument(
        "--rates", default="20,0", help="tokens/s per answer, comma-separated; 0 = unthrottled"
    )
    parser.add_argument("--readers", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each reader, in turns")
    parser.add_argument(
        "--asyncio", action="store_true", help="asyncio's own loop, as `tokenrelay worker` runs"
    )
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    only = [r for r in args.readers.split(",") if r] or None
    coro = _main(args.streams, args.tokens, rates, only, args.rounds)
    results = asyncio.run(coro) if args.asyncio else run(coro)
    print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
