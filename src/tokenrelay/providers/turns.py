"""Turns at a model that answers one question at a time, shared fairly between callers.

First come, first served would let one caller with many questions queued make everyone
else wait behind all of them. Here waiters are served round-robin across callers (first
come, first served within one caller), so a second caller waits for at most one answer
per other caller.
"""

from __future__ import annotations

import asyncio
from collections import deque


class FairTurns:
    """One holder at a time; waiters grouped by caller, served one per caller in turn."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._order: deque[str] = deque()  # callers with waiters, next to be served first

    def locked(self) -> bool:
        return self._held

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiters.values())

    def enqueue(self, caller: str) -> asyncio.Future[None]:
        """A future that is done when the turn is the caller's (at once when free)."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._held and not self._order:
            self._held = True
            turn.set_result(None)
            return turn
        if caller not in self._waiters:
            self._waiters[caller] = deque()
            self._order.append(caller)
        self._waiters[caller].append(turn)
        return turn

    async def acquire(self, caller: str = "") -> None:
        turn = self.enqueue(caller)
        try:
            await turn
        except BaseException:
            self.abandon(turn)
            raise

    def abandon(self, turn: asyncio.Future[None]) -> None:
        """The waiter left: pass the turn on if it had been given, else leave the queue."""
        if turn.done() and not turn.cancelled():
            self.release()
            return
        turn.cancel()
        for caller, queue in list(self._waiters.items()):
            if turn in queue:
                queue.remove(turn)
                if not queue:
                    del self._waiters[caller]
                    self._order.remove(caller)
                return

    def release(self) -> None:
        """End the holder's turn and give it to the next waiter, round-robin by caller."""
        while self._order:
            caller = self._order.popleft()
            queue = self._waiters[caller]
            turn = queue.popleft()
            if queue:
                self._order.append(caller)
            else:
                del self._waiters[caller]
            if not turn.done():
                turn.set_result(None)
                return
        self._held = False

    def ahead(self, turn: asyncio.Future[None]) -> int:
        """How many turns will be given before this waiter's."""
        queues = {caller: list(self._waiters[caller]) for caller in self._order}
        order = list(self._order)
        given = 0
        while order:
            caller = order.pop(0)
            if queues[caller].pop(0) is turn:
                return given
            given += 1
            if queues[caller]:
                order.append(caller)
        return given
