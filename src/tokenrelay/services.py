"""Every long-lived resource of a process, opened in order and closed in reverse."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from redis.asyncio import Redis

from tokenrelay.connection import (
    Lane,
    NodeReaders,
    cluster_client,
    dedicated_client,
    own_lane,
    pooled_client,
    warm,
)
from tokenrelay.embedded import EmbeddedValkey
from tokenrelay.errors import ConfigError
from tokenrelay.keys import Keys
from tokenrelay.providers.base import Provider
from tokenrelay.providers.guard import Timeouts
from tokenrelay.providers.select import build_provider
from tokenrelay.relay import Relay
from tokenrelay.settings import Settings
from tokenrelay.store import Limits, Store
from tokenrelay.worker import Worker

log = logging.getLogger(__name__)

# How long closing one resource may take before the stop goes on without it (a worker's
# stop: its grace period plus this), so that a stop never hangs on one part.
CLOSE_TIMEOUT_S = 10.0


def close_on_exit(
    stack: AsyncExitStack,
    what: str,
    close: Callable[[], Awaitable[object]],
    timeout_s: float = CLOSE_TIMEOUT_S,
) -> None:
    """Have `stack` await `close()` on exit, for at most `timeout_s`: past it the stop logs
    what it left behind and goes on with the rest."""

    async def bounded() -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await close()
        except TimeoutError:
            log.error("closing %s took over %g s; stopping without waiting for it", what, timeout_s)

    stack.push_async_callback(bounded)


@dataclass
class Services:
    settings: Settings
    redis_url: str
    store: Store
    relay: Relay | None = None
    workers: list[Worker] = field(default_factory=list)
    provider: Provider | None = None


@asynccontextmanager
async def redis_url_for(settings: Settings) -> AsyncIterator[str]:
    """REDIS_URL when set; else the embedded Valkey, stopped on exit if we started it."""
    if settings.redis_url:
        yield settings.redis_url
        return
    if settings.redis_cluster:
        raise ConfigError("TOKENRELAY_REDIS_CLUSTER needs REDIS_URL: one node of the cluster")
    embedded = EmbeddedValkey(settings.data_dir, maxmemory=settings.embedded_maxmemory)
    url = await asyncio.to_thread(embedded.start)
    try:
        yield url
    finally:
        await asyncio.to_thread(embedded.stop)


def redis_client(settings: Settings, url: str, *, size: int, name: str) -> Redis:
    """The process's pooled client: single node, or a cluster's (TOKENRELAY_REDIS_CLUSTER)."""
    if settings.redis_cluster:
        return cluster_client(url, size=size, name=name)
    return pooled_client(url, size=size, name=name)


def reader_client(settings: Settings, store: Store, url: str, *, name: str) -> Redis | NodeReaders:
    """A worker's connection(s) for blocking reads: one, or in a cluster one per shard."""
    if settings.redis_cluster:
        return NodeReaders(store.redis, name=name, block_ms=settings.block_ms)
    return dedicated_client(url, name=name, block_ms=settings.block_ms)


def make_keys(settings: Settings) -> Keys:
    return Keys(settings.key_prefix, settings.request_shard_count, settings.redis_cluster)


def make_store(settings: Settings, redis: Redis, lane: Lane | None = None) -> Store:
    limits = Limits(
        settings.retention_s,
        settings.history_max,
        settings.answer_maxlen,
        settings.max_queued,
        settings.max_queued_per_caller,
    )
    return Store(redis, make_keys(settings), limits, lane)


def make_worker(
    settings: Settings,
    store: Store,
    provider: Provider,
    redis_url: str,
    *,
    name: str | None = None,
    on_wedged: Callable[[], None] | None = None,
) -> Worker:
    return Worker(
        store,
        reader_client(settings, store, redis_url, name="tokenrelay-worker-read"),
        provider,
        concurrency=settings.worker_concurrency,
        block_ms=settings.block_ms,
        reclaim_idle_ms=settings.reclaim_idle_ms,
        max_deliveries=settings.max_deliveries,
        grace_period_s=settings.grace_period_s,
        timeouts=Timeouts(settings.first_token_timeout_s, settings.stall_timeout_s),
        name=name,
        on_wedged=on_wedged,
    )


@asynccontextmanager
async def open_services(
    settings: Settings,
    *,
    gateway: bool,
    workers: int,
    worker_name: str | None = None,
    on_wedged: Callable[[], None] | None = None,
) -> AsyncIterator[Services]:
    """Embedded server -> pool -> group -> relay -> provider -> workers; closed in reverse."""
    async with AsyncExitStack() as stack:
        provider = build_provider(settings) if workers else None
        url = await stack.enter_async_context(redis_url_for(settings))
        role = "gateway" if gateway else "worker"
        redis = redis_client(
            settings, url, size=settings.redis_pool_size, name=f"tokenrelay-{role}"
        )
        close_on_exit(stack, "the Redis pool", lambda: redis.aclose(close_connection_pool=True))
        await warm(redis, settings.redis_pool_size)
        # The connection the store's batches of concurrent commands go on (autopipeline.py):
        # opened now, so a process's connections do not change with its first ask.
        lane = own_lane(redis, "-batch")
        if lane is not None:
            close_on_exit(stack, "the batching connection", lane.aclose)
            await lane.open()
        store = make_store(settings, redis, lane)
        await store.ensure_group()
        services = Services(settings, url, store, provider=provider)
        if gateway:
            reader: Redis | None = None  # a cluster's relay opens one per shard itself
            if not settings.redis_cluster:
                reader = dedicated_client(
                    url, name="tokenrelay-gateway-read", block_ms=settings.block_ms
                )
                close_on_exit(stack, "the relay's reading connection", reader.aclose)
            relay = Relay(
                store, reader, block_ms=settings.block_ms, buffer_limit=settings.viewer_buffer
            )
            relay.start()
            close_on_exit(stack, "the relay", relay.stop)
            services.relay = relay
        if provider is not None:
            close_on_exit(stack, "the model client", provider.aclose)
            for _ in range(workers):
                worker = make_worker(
                    settings, store, provider, url, name=worker_name, on_wedged=on_wedged
                )
                await worker.start()
                grace_s = settings.grace_period_s + CLOSE_TIMEOUT_S
                close_on_exit(stack, f"worker {worker.name}", worker.stop, grace_s)
                services.workers.append(worker)
        yield services
