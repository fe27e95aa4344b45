"""A provider's stream under deadlines: no first token, or a stall, becomes a `timeout` error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from tokenrelay.errors import ProviderError
from tokenrelay.providers.base import Item, Waiting


@dataclass(frozen=True, slots=True)
class Timeouts:
    first_token_s: float
    stall_s: float


class Watchdog:
    """Cancels its task when one wait for the model outlasts its limit.

    One timer per answer, moved only when it fires: a chunk costs a clock read, where
    `asyncio.timeout` per chunk built and cancelled a timer each time (about 6% of the
    worker's CPU in py-spy at 100 answers x 20 tokens/s).
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._waiting = False
        self._due = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.expired = False

    def start(self, limit_s: float) -> None:
        self._waiting = True
        self._due = self._loop.time() + limit_s
        if self._timer is None:
            self._timer = self._loop.call_at(self._due, self._fire)

    def stop(self) -> None:
        self._waiting = False

    def ours(self) -> bool:
        """After a CancelledError: True when the watchdog alone cancelled the task."""
        return self.expired and self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        if not self._waiting:
            return  # the next wait re-arms it
        if self._loop.time() >= self._due:
            self.expired = True
            self._task.cancel()
        else:
            self._timer = self._loop.call_at(self._due, self._fire)


async def guarded(stream: AsyncIterator[Item], timeouts: Timeouts) -> AsyncGenerator[Item, None]:
    """The provider's stream, failing as `timeout` when the model goes quiet too long."""
    first = True
    watchdog = Watchdog()
    try:
        while True:
            limit = timeouts.first_token_s if first else timeouts.stall_s
            watchdog.start(limit)
            try:
                item = await anext(stream)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError as e:
                if not watchdog.ours():
                    raise
                what = "no first token" if first else "the model stalled mid-answer, no token"
                raise ProviderError(
                    "timeout",
                    f"{what} within {limit:g} s; the model server may be overloaded "
                    "(raise TOKENRELAY_FIRST_TOKEN_TIMEOUT_S / TOKENRELAY_STALL_TIMEOUT_S if it "
                    "is just slow)",
                ) from e
            finally:
                watchdog.stop()
            # Time spent waiting for a turn is not the model being slow.
            first = first and isinstance(item, Waiting)
            yield item
    finally:
        watchdog.close()


async def close_stream(stream: AsyncIterator[Item]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
