"""Asking on behalf of a client, and waiting for a whole answer ("without stream")."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tokenrelay.relay import Relay
from tokenrelay.store import Store, answer_text
from tokenrelay.wire import Entry, EntryType

WHOLE_ANSWER_TIMEOUT_S = 600.0
# Text one `GET /api/questions/{id}` returns at most (the JSON body is about twice that).
MAX_ANSWER_BYTES = 1 << 20
_PAGE_COUNT = 100


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


async def answer_page(
    store: Store, question_id: str, after: str, max_bytes: int = MAX_ANSWER_BYTES
) -> tuple[list[Entry], str | None]:
    """Entries after `after` holding at most `max_bytes` of text (at least one entry), and
    the cursor to read on from when the answer goes further (else None)."""
    entries: list[Entry] = []
    size = 0
    while True:
        page = await store.read(question_id, after, count=_PAGE_COUNT)
        for entry in page:
            cost = len(entry.text.encode()) + 100  # the event's other fields, roughly
            if entries and size + cost > max_bytes:
                return entries, entries[-1].entry_id
            entries.append(entry)
            size += cost
        if len(page) < _PAGE_COUNT:
            return entries, None
        after = page[-1].entry_id
