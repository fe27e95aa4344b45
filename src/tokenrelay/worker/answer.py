"""One answer's life on a worker: start entry, chunks, then exactly one terminal entry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from tokenrelay import logs, metrics
from tokenrelay.errors import Fenced, ProviderError, Rewound, StoreError
from tokenrelay.providers.base import (
    Finish,
    Item,
    Prompt,
    Provider,
    Reasoning,
    ToolCall,
    Waiting,
)
from tokenrelay.providers.guard import Pump, Timeouts, close_stream, guarded, pumped
from tokenrelay.store import Store, answer_text, next_entry_id, now_ms
from tokenrelay.wire import (
    STATUS_OF_TERMINAL,
    Entry,
    EntryType,
    QuestionRecord,
    QuestionRequest,
    Status,
)
from tokenrelay.worker.writer import LOST, ChunkWriter, Outbox

log = logging.getLogger(__name__)


class _Cancelled(Exception):
    """The asker cancelled between two chunks."""


# A terminal write finds the stream behind, has the outbox write the lost entries again,
# and tries again: a few times (each needs another failover).
_FINISH_TRIES = 4

RESTART_REASON = (
    "the model cannot continue a cut-off answer (it takes only the topic and the question), "
    "so it answered again from the start"
)


class _Resume:
    """Skips the part of a regenerated answer that a crashed worker already wrote.

    Used only for a model that cannot continue a cut-off answer (`continues = False`): the
    request is generated again; when the new text starts with the partial answer already in
    the stream (deterministic models), viewers see no seam. When it diverges, a `restart`
    entry tells viewers to drop what they have, and why.
    """

    def __init__(self, written: str) -> None:
        self.pending = written
        self.buffer = ""

    def feed(self, text: str) -> tuple[bool, str]:
        """(diverged, text to emit now)."""
        if not self.pending:
            return False, text
        self.buffer += text
        if self.pending.startswith(self.buffer):
            if len(self.buffer) == len(self.pending):
                self.pending = ""
            return False, ""
        if self.buffer.startswith(self.pending):
            rest, self.pending = self.buffer[len(self.pending) :], ""
            return False, rest
        emit, self.pending = self.buffer, ""
        return True, emit


@dataclass(frozen=True, slots=True)
class Generator:
    """What every answer of one worker shares: where it writes, what it asks, how long it
    waits."""

    store: Store
    writer: ChunkWriter
    provider: Provider
    timeouts: Timeouts


class Answer:
    """One request being answered. `run()` returns the final status.

    Task cancellation (worker shutdown) propagates without a terminal entry and
    without XACK, so another worker reclaims the request.
    """

    def __init__(
        self, store: Store, request: QuestionRequest, request_entry_id: str | None
    ) -> None:
        self.store = store
        self.request = request
        self.request_entry_id = request_entry_id
        self.record: QuestionRecord | None = None
        self.epoch = 0  # this delivery's: set by `begin`, checked by every write
        self._after = ""  # the stream's last entry when this delivery began
        self.chunks = 0
        self.first_ms = 0
        self._resume = _Resume("")
        self._partial = ""  # what a stopped worker wrote: the model is asked to continue it
        self._pieces = 0  # text pieces the model gave this delivery
        self._box: Outbox | None = None  # the answer's entries on their way to its stream
        # The start entry's write, on its way while the model is asked: awaited before the
        # first entry of the answer is queued and before its end.
        self._starting: asyncio.Task[str] | None = None
        self._ahead = -1
        self._gap = metrics.GapTimer()
        # Set once `_prepare` has opened the answer (its box, epoch, start entry): a model
        # asked before that waits for it before its first item is taken.
        self._prepared = asyncio.Event()

    async def run(self, gen: Generator, *, resumed: bool = False) -> Status:
        try:
            return await self._run(gen, resumed=resumed)
        except Fenced:
            # Paused long enough to be reclaimed: the answer is another worker's now. No
            # terminal entry, no ack: they are the new writer's to make.
            log.warning("question %s: another worker took over; this one stops", self.request.id)
            return Status.STREAMING
        finally:
            starting, self._starting = self._starting, None
            if starting is not None and not starting.done():
                starting.cancel()  # stopped before the model said anything
            elif starting is not None and not starting.cancelled():
                starting.exception()  # what it raised went nowhere: the answer was stopping

    async def _started(self) -> None:
        """Wait for the start entry's write (raising what it ran into)."""
        starting, self._starting = self._starting, None
        if starting is not None:
            await starting

    async def _run(self, gen: Generator, *, resumed: bool) -> Status:
        # A model that pushes its items is asked while the answer is opened: its request does
        # not wait for that round trip (nor for the batch it goes in, in a burst). A resumed
        # answer's prompt needs what was written first (and a turn-taking model, the caller).
        asking = None
        if not resumed and getattr(gen.provider, "pump", None) is not None:
            asking = asyncio.create_task(self._stream(gen), name=f"ask-{self.request.id}")
        try:
            done = await self._prepare(gen, resumed=resumed)
        except BaseException:
            await _dropped(asking)
            raise
        if done is not None:
            await _dropped(asking)
            return done
        self._prepared.set()
        try:
            finish = await (asking if asking is not None else self._stream(gen))
        except _Cancelled:
            # What was spent so far: the model's pieces received (a streamed answer's usage
            # comes only at its end, which a cancel never reaches). The partial text stays
            # in the answer stream.
            spent = {"completion_tokens": self._pieces}
            return await self._end(Entry(EntryType.CANCELLED, meta=spent), usage=spent)
        except ProviderError as e:
            log.warning("question %s: model error (%s): %s", self.request.id, e.kind, e.message)
            return await self._end(Entry(EntryType.ERROR, e.message, {"kind": e.kind}), e.message)
        except Exception as e:
            log.exception("question %s: unexpected failure", self.request.id)
            message = f"tokenrelay failed while answering ({type(e).__name__}); see the worker log"
            return await self._end(Entry(EntryType.ERROR, message, {"kind": "internal"}), message)
        usage = {
            "prompt_tokens": finish.prompt_tokens,
            "completion_tokens": finish.completion_tokens,
        }
        end = Entry(EntryType.END, meta={"finish_reason": finish.reason, **usage})
        return await self._end(end, usage=usage)

    async def fail_undeliverable(self, deliveries: int) -> None:
        """A request that keeps crashing its workers ends failed instead of looping forever."""
        message = (
            f"gave up after {deliveries} attempts: each worker that took this question "
            "stopped before finishing it"
        )
        if await self._load() is None:
            return
        assert self.record is not None
        self.chunks = self.record.chunks
        self.epoch, self._after = await self.store.begin_answer(self.request.id)
        await self._end(Entry(EntryType.ERROR, message, {"kind": "undeliverable"}), message)

    async def fail_lost(self, record: QuestionRecord) -> None:
        """A queued question whose request vanished ends failed instead of waiting forever."""
        self.record = record
        self.epoch, self._after = await self.store.begin_answer(self.request.id)
        message = (
            "this question's request was lost before any worker took it (Redis restarted "
            "without it?); ask again"
        )
        await self._end(Entry(EntryType.ERROR, message, {"kind": "lost"}), message)

    # -- steps ---------------------------------------------------------------

    async def _load(self) -> QuestionRecord | None:
        """The record; None (request acknowledged) when it is gone."""
        try:
            self.record = await self.store.record(self.request.id)
        except LookupError:
            await self._drop()
            return None
        return self.record

    async def _drop(self) -> None:
        """The question's record is gone: its request is acknowledged, nothing answered."""
        log.warning("question %s has no record (expired?); dropping its request", self.request.id)
        await self._ack()

    async def _prepare(self, gen: Generator, *, resumed: bool) -> Status | None:
        """Load the record, begin this delivery (one round trip) and write the start entry;
        a status when nothing is left to do."""
        provider = gen.provider
        opened = await self.store.open_answer(self.request.id)
        if opened is None:
            await self._drop()
            return Status.FAILED
        record, self.epoch, self._after = opened
        self.record = record
        if record.status not in (Status.QUEUED, Status.STREAMING):
            await self._ack()  # finished before a crash could ack it
            return record.status
        self._box = gen.writer.outbox(self.request.id, self.epoch, self._after)
        if record.cancel_requested:
            return await self._end(Entry(EntryType.CANCELLED))
        prior = await self.store.read_all(self.request.id) if resumed else []
        if not any(e.type is EntryType.START for e in prior):
            # Written while the model is asked (its first piece waits for it): the start
            # entry's round trips are not part of the time to first chunk.
            self._starting = asyncio.create_task(
                self._write_start(provider, record), name=f"start-{self.request.id}"
            )
        written = answer_text(prior)
        if getattr(provider, "continues", True):
            self._partial = written
        else:
            self._resume = _Resume(written)
        self.chunks = sum(1 for e in prior if e.type is EntryType.CHUNK)
        return None

    def _write_start(self, provider: Provider, record: QuestionRecord) -> Coroutine[Any, Any, str]:
        """The start entry's write; numbered now, before any entry after it."""
        request = self.request
        start = Entry(
            EntryType.START,
            meta={
                "topic": request.topic,
                "question": request.question,
                "model": provider.model,
                "provider": provider.name,
                "created_ms": record.created_ms,
            },
        )
        fields = {
            "status": Status.STREAMING.value,
            "started_ms": str(now_ms()),
            "model": provider.model,
            "provider": provider.name,
        }
        assert self._box is not None
        put = self._box.number(start)
        return self.store.start(
            request, start, fields, self.epoch, entry_id=put.entry_id, after=put.after
        )

    async def _stream(self, gen: Generator) -> Finish:
        """Read the model and queue what it says; the model is read again without waiting
        for the previous write (the outbox coalesces chunks while a write is on its way).
        A pushing model may be asked before the answer is opened (see `_run`)."""
        request = self.request
        prompt = Prompt(
            request.topic,
            request.question,
            request.history,
            self._partial,
            request.options,
            self.record.caller if self.record is not None else "",  # a pushing model's: unused
        )
        pump: Pump | None = getattr(gen.provider, "pump", None)
        if pump is not None:
            finish = await self._pumped(pump, prompt, gen.timeouts)
        else:
            assert self._box is not None
            finish = await self._pulled(gen.provider.stream(prompt), self._box, gen.timeouts)
        box = self._box
        assert box is not None  # opened before the model's first item was taken
        await box.drain()
        if box.cancel_requested:
            raise _Cancelled
        return finish

    async def _pumped(self, pump: Pump, prompt: Prompt, timeouts: Timeouts) -> Finish:
        """A provider that pushes its items: each is queued from the model's I/O callback,
        without a wake-up of this task per chunk. The first is taken once the answer is
        open and its start entry written."""
        finish = Finish()
        box: Outbox | None = None

        async def ready() -> None:
            nonlocal box
            await self._prepared.wait()
            assert self._box is not None
            box = self._box
            await self._started()

        def take(item: Item) -> None:
            nonlocal finish
            assert box is not None  # the pump awaits ready() before its first item
            if box.cancel_requested:
                raise _Cancelled
            if isinstance(item, Waiting):  # a provider that queues pulls (see _pulled)
                raise TypeError("a pushing provider sent Waiting")
            if (done := self._take(box, item)) is not None:
                finish = done

        await pumped(pump, prompt, take, ready, timeouts)
        return finish

    async def _pulled(self, stream: AsyncIterator[Item], box: Outbox, timeouts: Timeouts) -> Finish:
        items = guarded(stream, timeouts)
        finish = Finish()
        try:
            async for item in items:
                if self._starting is not None:  # once per answer, not a coroutine per chunk
                    await self._started()
                if box.cancel_requested:
                    raise _Cancelled
                if isinstance(item, Waiting):
                    # Waiting writes nothing when nothing changed: read the flag itself, so
                    # a cancel reaches an answer still queued for a local model.
                    if await self.store.cancel_requested(self.request.id):
                        raise _Cancelled
                    self._waiting(box, item.ahead)
                elif (done := self._take(box, item)) is not None:
                    finish = done
        finally:
            # Close now, not at garbage collection: it ends the model's HTTP stream.
            await items.aclose()
            await close_stream(stream)
        return finish

    def _take(self, box: Outbox, item: str | Finish | Reasoning | ToolCall) -> Finish | None:
        """Queue what the model said; its Finish is returned, not queued."""
        if type(item) is str:  # most items: checked first
            self._text(box, item)
        elif isinstance(item, Finish):
            return item
        elif isinstance(item, Reasoning | ToolCall):
            self._extra(box, item)
        else:
            self._text(box, item)
        return None

    def _waiting(self, box: Outbox, ahead: int) -> None:
        if ahead != self._ahead:
            self._ahead = ahead
            box.put(Entry(EntryType.WAITING, meta={"ahead": ahead}))

    def _extra(self, box: Outbox, item: Reasoning | ToolCall) -> None:
        """A reasoning model's thoughts, a tool call's pieces: typed entries of their own,
        resumable like the text, never part of it."""
        if isinstance(item, Reasoning):
            box.put(Entry(EntryType.REASONING, item.text))
        else:
            meta = {"index": item.index, "id": item.id, "name": item.name}
            box.put(Entry(EntryType.TOOL_CALL, item.arguments, meta))
        self.first_ms = self.first_ms or now_ms()

    def _text(self, box: Outbox, text: str) -> None:
        if self._resume.pending:
            diverged, text = self._resume.feed(text)
            if diverged:
                box.put(Entry(EntryType.RESTART, meta={"reason": RESTART_REASON}))
                self.chunks = 0
        if not text:
            return
        box.put(Entry(EntryType.CHUNK, text))
        # Pieces the model gave, whatever the batching: queued pieces may share an entry.
        self.chunks += 1
        self._pieces += 1
        self._gap.tick()
        self.first_ms = self.first_ms or now_ms()

    async def _end(
        self, entry: Entry, error: str = "", *, usage: dict[str, int] | None = None
    ) -> Status:
        """Write the one terminal entry, close the record, acknowledge the request."""
        assert self.record is not None
        await self._started()
        for _ in range(_FINISH_TRIES):
            entry, error = await self._flush(entry, error)
            created = self.record.created_ms
            ended = now_ms()
            ttft_ms = self.first_ms - created if self.first_ms else -1
            stats = {"chunks": self.chunks, "ttft_ms": ttft_ms, "duration_ms": ended - created}
            fields: dict[str, object] = {
                **stats,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                **(usage or {}),
            }
            if error:
                fields["error"] = error
            terminal = Entry(entry.type, entry.text, {**entry.meta, **stats})
            entry_id, after = self._terminal_ids()
            try:
                await self.store.finish(
                    self.request.id,
                    terminal,
                    fields,
                    self.request_entry_id,
                    self.record.caller,
                    self.epoch,
                    entry_id=entry_id,
                    after=after,
                )
            except Rewound as e:
                if self._box is None:
                    raise
                self._box.rewind(e.last_entry_id)
                continue
            metrics.answer_ended(entry, ttft_ms)
            logs.answer_ended(self.request.id, entry, fields)
            return STATUS_OF_TERMINAL[entry.type]
        raise StoreError(f"question {self.request.id}: its stream kept losing entries")

    async def _flush(self, entry: Entry, error: str) -> tuple[Entry, str]:
        """Everything queued goes first. A failed write (but a fence) does not stop the
        terminal entry: it says what went wrong; a loss that cannot be repaired turns it
        into an error."""
        if self._box is not None:
            with contextlib.suppress(StoreError, RedisError, OSError):
                await self._box.drain()
            if self._box.lost:
                message = LOST[0].upper() + LOST[1:] + "."
                return Entry(EntryType.ERROR, message, {"kind": "lost"}), message
        return entry, error

    def _terminal_ids(self) -> tuple[str, str]:
        """The terminal entry's id and the one it follows ("*": whatever the stream holds,
        when what was lost could not be written again)."""
        box = self._box
        if box is None:
            return next_entry_id(self._after, now_ms()), self._after
        return next_entry_id(box.last_id, now_ms()), "*" if box.lost else box.last_id

    async def _ack(self) -> None:
        if self.request_entry_id is not None:
            await self.store.ack(self.request_entry_id)


async def _dropped(asking: asyncio.Task[Finish] | None) -> None:
    """Stop a model asked early for an answer that turned out to need no answer (ended,
    gone, cancelled) or that could not be opened: its request is cut off, what it raised
    goes nowhere."""
    if asking is not None:
        asking.cancel()
        await asyncio.gather(asking, return_exceptions=True)
