"""A provider's stream under deadlines: no first token, or a stall, becomes a `timeout` error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from tokenrelay.errors import ProviderError
from tokenrelay.providers.base import Item, Prompt, Waiting


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

    def resume(self) -> None:
        """Waiting again, for the deadline `stop` interrupted."""
        self._waiting = True
        if self._timer is None:
            self._timer = self._loop.call_at(self._due, self._fire)

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
                raise _timed_out(first, limit) from e
            finally:
                watchdog.stop()
            # Time spent waiting for a turn is not the model being slow.
            first = first and isinstance(item, Waiting)
            yield item
    finally:
        watchdog.close()


class Pump(Protocol):
    """A provider's `pump` (see `OpenAIProvider.pump`): its items pushed to `take`."""

    def __call__(
        self, prompt: Prompt, take: Callable[[Item], None], ready: Callable[[], Awaitable[None]]
    ) -> Awaitable[None]: ...


async def pumped(
    pump: Pump,
    prompt: Prompt,
    take: Callable[[Item], None],
    ready: Callable[[], Awaitable[None]],
    timeouts: Timeouts,
) -> None:
    """`guarded` for a provider that pushes its items: the same deadlines and errors, the
    watchdog moved by each item as it is taken. While `ready` is awaited the watchdog does
    not fire: the first token's deadline counts from the request, as in `guarded`, but only
    a token not there when `ready` returns misses it (`guarded` awaits `ready`'s work after
    the first item)."""
    first = True
    limit = timeouts.first_token_s
    watchdog = Watchdog()

    def timed(item: Item) -> None:
        nonlocal first, limit
        if watchdog.expired:
            return  # the task is being cancelled: no later item counts (as in `guarded`)
        take(item)
        # Time spent waiting for a turn is not the model being slow.
        first = first and isinstance(item, Waiting)
        limit = timeouts.first_token_s if first else timeouts.stall_s
        watchdog.start(limit)

    async def paused() -> None:
        watchdog.stop()
        await ready()
        watchdog.resume()  # the items that came meanwhile move it on as they are taken

    watchdog.start(limit)
    try:
        await pump(prompt, timed, paused)
    except asyncio.CancelledError as e:
        if not watchdog.ours():
            raise
        raise _timed_out(first, limit) from e
    finally:
        watchdog.close()


def _timed_out(first: bool, limit_s: float) -> ProviderError:
    what = "no first token" if first else "the model stalled mid-answer, no token"
    return ProviderError(
        "timeout",
        f"{what} within {limit_s:g} s; the model server may be overloaded "
        "(raise TOKENRELAY_FIRST_TOKEN_TIMEOUT_S / TOKENRELAY_STALL_TIMEOUT_S if it "
        "is just slow)",
    )


async def close_stream(stream: AsyncIterator[Item]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
