"""Redis clients: one bounded pool per process, plus dedicated connections for blocking reads."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

BLOCK_MARGIN_S = 10.0

_RETRY_ERRORS: list[type[Exception]] = [RedisConnectionError, RedisTimeoutError]


def _retry() -> Retry:
    # A Redis restart takes a few seconds: back off up to ~2 s between tries.
    return Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=8)


def pooled_client(url: str, *, size: int, name: str) -> Redis:
    """A client whose pool never holds more than `size` connections; callers queue for one."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=size,
        timeout=None,
        decode_responses=True,
        client_name=name,
        health_check_interval=30,
        socket_keepalive=True,
    )
    return Redis(connection_pool=pool, retry=_retry(), retry_on_error=_RETRY_ERRORS)


def dedicated_client(url: str, *, name: str, block_ms: int) -> Redis:
    """One connection of its own, for a blocking XREAD/XREADGROUP loop.

    redis-py's default 5 s socket timeout would cut every longer block short; the read
    timeout here outlasts the block by a margin, so only a dead server trips it.
    """
    return Redis.from_url(
        url,
        decode_responses=True,
        client_name=name,
        single_connection_client=True,
        socket_keepalive=True,
        socket_timeout=block_ms / 1000 + BLOCK_MARGIN_S,
    )


async def warm(client: Redis, count: int) -> None:
    """Open `count` pool connections now, so the number a process holds never depends on load."""
    pool = client.connection_pool
    conns = [await pool.get_connection() for _ in range(count)]  # type: ignore[no-untyped-call]
    for conn in conns:
        await pool.release(conn)
