"""Asking on behalf of a client, and waiting for a whole answer ("without stream")."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tokenrelay.relay import Relay
from tokenrelay.store import answer_text
from tokenrelay.wire import Entry, EntryType

WHOLE_ANSWER_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class WholeAnswer:
    text: str
    last: Entry  # the terminal entry (end, error or cancelled)

    @property
    def ok(self) -> bool:
        return self.last.type is EntryType.END


async def whole_answer(
    relay: Relay, question_id: str, timeout_s: float = WHOLE_ANSWER_TIMEOUT_S
) -> WholeAnswer:
    """Follow the answer to its terminal entry; TimeoutError past `timeout_s`."""
    entries: list[Entry] = []
    async with asyncio.timeout(timeout_s):
        async for entry in relay.follow(question_id):
            entries.append(entry)
            if entry.terminal:
                return WholeAnswer(answer_text(entries), entry)
    raise RuntimeError("answer stream ended without a terminal entry")  # follow() never does
