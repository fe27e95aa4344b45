"""What one script call of an ask costs the process that sends it, by how it is sent.

The store sends the commands of concurrent callers (asks, record reads, an answer's start
and end) together (`tokenrelay.store.autopipeline`). Measured here, in this process's own
CPU time and in wall time, against a Valkey of its own (or `--redis-url`):

- `redis-py pipeline`: a redis-py pipeline per batch, as the store did before;
- `batched, pool`: the store's batcher, packed by hand, on a pool connection;
- `batched, lane`: the same on a connection of its own, as `serve`, the gateway and the
  worker run it.

Two shapes: one caller at a time (a lone ask: latency), and bursts of `--burst` callers at
once (CPU per call). The ways take turns, `--rounds` times over. Run it alone with
`python -m bench.batchcost` (`--help`).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.loop import run
from tokenrelay.connection import Lane, pooled_client, warm
from tokenrelay.services import redis_url_for
from tokenrelay.settings import Settings
from tokenrelay.store.autopipeline import AutoPipeline

# Shaped as an ask: a record's fields written, a reply read.
_SCRIPT = "redis.call('HSET', KEYS[1], unpack(ARGV)) return redis.call('HLEN', KEYS[1])"
_FIELDS = [
    "topic",
    "Redis",
    "question",
    "What is a stream? " * 4,
    "status",
    "queued",
    "created_ms",
    "1764547200000",
]

Burst = Callable[[range], Awaitable[list[Any]]]  # the calls numbered by the range, at once


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(send: Burst, calls: int, burst: int) -> tuple[float, float]:
    """(wall µs, CPU µs) per call: `calls` calls, `burst` at a time."""
    wall, cpu = time.perf_counter(), _cpu_s()
    for at in range(0, calls, burst):
        replies = await send(range(at, min(at + burst, calls)))
        assert replies == [len(_FIELDS) // 2] * len(replies), replies[:3]
    n = max(calls, 1)
    return (time.perf_counter() - wall) * 1e6 / n, (_cpu_s() - cpu) * 1e6 / n


async def _main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="tokenrelay-batchcost-") as tmp:
        settings = Settings(redis_url=args.redis_url, data_dir=Path(tmp))
        async with redis_url_for(settings) as url:
            redis = pooled_client(url, size=8, name="tokenrelay-bench")
            lane = Lane(redis, "-batch")
            try:
                await warm(redis, 8)
                await lane.open()
                await _compare(redis, lane, args)
            finally:
                await lane.aclose()
                await redis.aclose(close_connection_pool=True)


async def _compare(redis: Redis, lane: Lane, args: argparse.Namespace) -> None:
    script = redis.register_script(_SCRIPT)
    await script(keys=["bench:batch:0"], args=_FIELDS)  # loaded once, as the store's are
    on_pool, on_lane = AutoPipeline(redis), AutoPipeline(redis, lane)

    async def pipeline(calls: range) -> list[Any]:
        # What the batcher was: the calls of the moment queued in one redis-py pipeline (as
        # EVALSHA: its pipelines skipped redis-py's SCRIPT EXISTS round trip).
        async with redis.pipeline(transaction=False) as pipe:
            for n in calls:
                pipe.evalsha(script.sha, 1, f"bench:batch:{n % 100}", *_FIELDS)
            return list(await pipe.execute())

    def batched(together: AutoPipeline) -> Burst:
        async def send(calls: range) -> list[Any]:
            return await asyncio.gather(
                *(together.script(script, [f"bench:batch:{n % 100}"], _FIELDS) for n in calls)
            )

        return send

    ways: dict[str, Burst] = {
        "redis-py pipeline": pipeline,
        "batched, pool": batched(on_pool),
        "batched, lane": batched(on_lane),
    }
    shapes = {"one at a time": 1, f"{args.burst} at once": args.burst}
    seen: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for shape, burst in shapes.items():
            for name, send in ways.items():
                await _measure(send, burst * 5, burst)  # warm up
                seen.setdefault((shape, name), []).append(await _measure(send, args.calls, burst))
    print(f"{args.calls} script calls per run, median of {args.rounds} rounds (µs per call)")
    print(f"{'shape':<16} {'way':<20} {'wall':>8} {'CPU':>8}")
    for (shape, name), runs in seen.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"{shape:<16} {name:<20} {wall:8.1f} {cpu:8.1f}")
    await redis.delete(*(f"bench:batch:{n}" for n in range(100)))


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.batchcost", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--calls", type=int, default=3000, help="script calls per run")
    parser.add_argument("--burst", type=int, default=100, help="callers at once, second shape")
    parser.add_argument("--rounds", type=int, default=3, help="turns of every way")
    parser.add_argument("--redis-url", default=None, help="default: a Valkey of its own")
    run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
