"""A python-socketio client for the tests, and waiting for what it receives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import socketio


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[tuple[socketio.AsyncClient, list[tuple[str, Any]]]]:
    """A python-socketio client that records every event it receives, in order."""
    client = socketio.AsyncClient(reconnection=False)
    received: list[tuple[str, Any]] = []

    @client.on("*")  # type: ignore[untyped-decorator]
    async def any_event(event: str, data: Any) -> None:
        received.append((event, data))

    await client.connect(url, transports=["websocket"])
    try:
        yield client, received
    finally:
        await client.disconnect()
        await client.wait()


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)
