"""Turns at a one-at-a-time model (the local provider): callers are served in turn."""

from __future__ import annotations

import asyncio

import pytest

from tokenrelay.providers.turns import FairTurns


async def test_callers_are_served_round_robin_and_in_order_within_one() -> None:
    turns = FairTurns()
    await turns.acquire("a")  # a's first answer is running
    served: list[str] = []
    waiters = [turns.enqueue(c) for c in ("a", "a", "a", "b", "c", "a")]
    names = ["a2", "a3", "a4", "b1", "c1", "a5"]
    assert [turns.ahead(w) for w in waiters] == [0, 3, 4, 1, 2, 5]
    for _ in names:
        turns.release()
        await asyncio.sleep(0)
        served += [n for n, w in zip(names, waiters, strict=True) if w.done() and n not in served]
    assert served == ["a2", "b1", "c1", "a3", "a4", "a5"]
    turns.release()
    assert not turns.locked() and turns.waiting == 0


async def test_a_waiter_that_leaves_passes_its_turn_on() -> None:
    turns = FairTurns()
    await turns.acquire("a")
    leaving, staying = turns.enqueue("b"), turns.enqueue("c")
    turns.abandon(leaving)  # gave up before its turn
    turns.release()
    assert staying.done() and turns.waiting == 0
    granted = turns.enqueue("d")
    turns.release()  # c's turn ends: d's begins
    assert granted.done()
    turns.abandon(granted)  # d leaves holding the turn: it is free again
    assert not turns.locked()


async def test_a_cancelled_acquire_leaves_no_trace() -> None:
    turns = FairTurns()
    await turns.acquire()
    task = asyncio.create_task(turns.acquire("x"))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert turns.waiting == 0
    turns.release()
    assert not turns.locked()
