"""wait_set wakes for its event or gives up at its timeout; Backoff doubles to its cap and
starts again after a success."""

from __future__ import annotations

import asyncio

from tokenrelay.pacing import Backoff, wait_set


async def test_wait_set_wakes_when_the_event_is_set() -> None:
    event = asyncio.Event()
    event.set()  # set before the wait: cleared, so this set does not count
    loop = asyncio.get_running_loop()
    loop.call_later(0.02, event.set)
    started = loop.time()
    assert await wait_set(event, 5.0) is True
    assert 0.015 <= loop.time() - started < 2.0


async def test_wait_set_gives_up_at_its_timeout() -> None:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await wait_set(event, 0.05) is False
    assert loop.time() - started >= 0.045
    assert not event.is_set()


async def test_backoff_doubles_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.001, 0.004)
    delays = []
    for _ in range(4):
        delays.append(backoff.delay_s)
        await backoff.sleep()
    assert delays == [0.001, 0.002, 0.004, 0.004]
    backoff.reset()
    assert backoff.delay_s == 0.001
