"""How long a loop waits: for an event or a timeout, and before it tries again."""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Clear `event`, then wait until it is set again or `timeout_s` has passed; whether it
    was set. A loop that wakes for either does its work and calls this again."""
    event.clear()
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


class Backoff:
    """A delay before the next try that doubles after each failure, from `first_s` up to
    `most_s`, and starts again from `first_s` after a success."""

    __slots__ = ("delay_s", "first_s", "most_s")

    def __init__(self, first_s: float, most_s: float) -> None:
        self.first_s = first_s
        self.most_s = most_s
        self.delay_s = first_s

    async def sleep(self) -> None:
        """Wait the current delay, and double it for the next failure."""
        delay_s = self.delay_s
        self.delay_s = min(delay_s * 2, self.most_s)
        await asyncio.sleep(delay_s)

    def reset(self) -> None:
        self.delay_s = self.first_s
