"""The gateway's one path for asking, attaching and waiting for a whole answer, used by
HTTP, Socket.IO and the OpenAI front door alike, so each answers the same way."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tokenrelay.errors import AnswerTimeout
from tokenrelay.gateway.access import Access, Caller
from tokenrelay.gateway.inputs import AskInput, reachable_cursor
from tokenrelay.relay import Direct, Relay
from tokenrelay.services import Services
from tokenrelay.store import Store, answer_text
from tokenrelay.wire import FINISHED_STATUSES, Context, Entry, EntryType, QuestionRecord

WHOLE_ANSWER_TIMEOUT_S = 600.0
# Text one `GET /api/questions/{id}` returns at most (the JSON body is about twice that).
MAX_ANSWER_BYTES = 1 << 20
_PAGE_COUNT = 100


@dataclass(frozen=True, slots=True)
class WholeAnswer:
    text: str
    last: Entry  # the terminal entry (end, error or cancelled)
    entries: tuple[Entry, ...] = ()  # since the last restart: reasoning, tool calls, text

    @property
    def ok(self) -> bool:
        return self.last.type is EntryType.END


async def ask(
    svc: Services,
    access: Access,
    who: Caller,
    asked: AskInput,
    idempotency_key: str | None = None,
    context: Context | None = None,
) -> QuestionRecord:
    """Ask for `who`: rate limit, backlog and per-caller caps, owner. With an idempotency
    key, a retry of the same question gets the first ask's question, never a second
    generation (a different question with the key: Conflict)."""
    store = svc.store
    if idempotency_key is None:
        access.admit_question(who)
        return await store.ask(
            asked.topic, asked.question, owner=who.owner, caller=who.client, context=context
        )
    body = f"{asked.topic}\0{asked.question}\0{context!r}"
    digest = hashlib.sha256(body.encode()).hexdigest()[:32]
    first = await store.claim(who.client, idempotency_key, digest)
    if first is not None:
        return await store.record(first)
    try:
        access.admit_question(who)
        record = await store.ask(
            asked.topic, asked.question, owner=who.owner, caller=who.client, context=context
        )
    except BaseException:
        await store.withdraw(who.client, idempotency_key)
        raise
    await store.remember(who.client, idempotency_key, digest, record.id)
    return record


async def attach(
    svc: Services, access: Access, who: Caller, question_id: str, cursor: str = "0-0"
) -> tuple[QuestionRecord, str]:
    """The record of a question `who` may see (NotFound otherwise, as for an unknown id: one
    read gives both), and `cursor` if an entry can still follow it."""
    record = await svc.store.record(question_id)
    access.check_record(question_id, record.owner, who)
    return record, await reachable_cursor(svc.store, question_id, cursor)


def at_end(record: QuestionRecord, cursor: str) -> bool:
    """True when `cursor` is the terminal entry of a finished answer: nothing can follow."""
    return record.status in FINISHED_STATUSES and cursor == record.last_entry_id


async def follow(svc: Services, record: QuestionRecord, cursor: str) -> AsyncIterator[Entry]:
    """The answer's entries after `cursor`, live, to its terminal entry; nothing at all when
    the cursor already is that entry (else the viewer would wait for ever)."""
    async for batch in follow_batches(svc, record, cursor):
        for entry in batch:
            yield entry


def follow_batches(
    svc: Services, record: QuestionRecord, cursor: str, direct: Direct | None = None
) -> AsyncIterator[list[Entry]]:
    """`follow`'s entries, as many at a time as are ready: a viewer writes each batch at once.
    The relay's generator itself (no layer of ours around it: each costs a resumption per
    batch, on the way to the viewer's socket). `direct`: see `Relay.batches`."""
    if at_end(record, cursor):
        return _nothing()
    assert svc.relay is not None
    return svc.relay.batches(record.id, cursor, direct)


async def _nothing() -> AsyncIterator[list[Entry]]:
    return
    yield


async def whole(svc: Services, question_id: str) -> WholeAnswer:
    """The answer once it has ended; AnswerTimeout past WHOLE_ANSWER_TIMEOUT_S."""
    assert svc.relay is not None
    try:
        return await whole_answer(svc.relay, question_id)
    except TimeoutError as e:
        raise AnswerTimeout(
            "the answer did not finish in time; it goes on: watch it to read the rest"
        ) from e


async def whole_answer(
    relay: Relay, question_id: str, timeout_s: float = WHOLE_ANSWER_TIMEOUT_S
) -> WholeAnswer:
    """Follow the answer to its terminal entry; TimeoutError past `timeout_s`."""
    entries: list[Entry] = []
    async with asyncio.timeout(timeout_s):
        async for entry in relay.follow(question_id):
            entries.append(entry)
            if entry.terminal:
                restarts = [i for i, e in enumerate(entries) if e.type is EntryType.RESTART]
                since = entries[restarts[-1] + 1 :] if restarts else entries
                return WholeAnswer(answer_text(entries), entry, tuple(since))
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
