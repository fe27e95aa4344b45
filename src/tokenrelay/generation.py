"""One answer's life on a worker: start entry, chunks, then exactly one terminal entry."""

from __future__ import annotations

import asyncio
import logging

from tokenrelay import logs, metrics
from tokenrelay.errors import ProviderError
from tokenrelay.providers.base import Finish, Prompt, Provider, Waiting
from tokenrelay.providers.guard import Timeouts, close_stream, guarded
from tokenrelay.store import Store, answer_text, now_ms
from tokenrelay.wire import Entry, EntryType, QuestionRecord, QuestionRequest, Status
from tokenrelay.writer import ChunkWriter

log = logging.getLogger(__name__)

# How stale a chunk's view of the cancel flag may be: read with at most one chunk's XADD per
# interval, not with every chunk (half of the worker's Redis commands at 20 tokens/s).
CANCEL_CHECK_S = 0.1


class _Cancelled(Exception):
    """The asker cancelled between two chunks."""


class _Resume:
    """Skips the part of a regenerated answer that a crashed worker already wrote.

    A reclaimed request is generated again; when the new text starts with the
    partial answer already in the stream (deterministic models), viewers see no
    seam. When it diverges, a `restart` entry tells viewers to drop what they have.
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


async def generate(
    store: Store,
    writer: ChunkWriter,
    provider: Provider,
    request: QuestionRequest,
    request_entry_id: str | None,
    timeouts: Timeouts,
    *,
    resumed: bool = False,
) -> Status:
    """Answer `request` into its stream. Returns the final status.

    Task cancellation (worker shutdown) propagates without a terminal entry and
    without XACK, so another worker reclaims the request.
    """
    try:
        record = await store.record(request.id)
    except LookupError:
        log.warning("question %s has no record (expired?); dropping its request", request.id)
        if request_entry_id is not None:
            await store.ack(request_entry_id)
        return Status.FAILED
    if record.status not in (Status.QUEUED, Status.STREAMING):
        if request_entry_id is not None:  # finished before a crash could ack it
            await store.ack(request_entry_id)
        return record.status
    if record.cancel_requested:
        await _finish(store, request, request_entry_id, Entry(EntryType.CANCELLED), record, 0)
        return Status.CANCELLED

    prior = await store.read_all(request.id) if resumed else []
    if not any(e.type is EntryType.START for e in prior):
        started = now_ms()
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
        await store.start(
            request,
            start,
            {
                "status": Status.STREAMING.value,
                "started_ms": str(started),
                "model": provider.model,
                "provider": provider.name,
            },
        )
    resume = _Resume(answer_text(prior))
    chunks = sum(1 for e in prior if e.type is EntryType.CHUNK)
    first_ms = 0
    gap = metrics.GapTimer()
    loop = asyncio.get_running_loop()
    next_cancel_check = 0.0
    try:
        stream = provider.stream(Prompt(request.topic, request.question))
        items = guarded(stream, timeouts)
        finish = Finish()
        ahead = -1
        try:
            async for item in items:
                if isinstance(item, Finish):
                    finish = item
                    continue
                if isinstance(item, Waiting):
                    if item.ahead != ahead:
                        ahead = item.ahead
                        wait = Entry(EntryType.WAITING, meta={"ahead": ahead})
                        await writer.append(request.id, wait)
                    continue
                diverged, text = resume.feed(item)
                if diverged:
                    await writer.append(request.id, Entry(EntryType.RESTART))
                    chunks = 0
                if not text:
                    continue
                check = loop.time() >= next_cancel_check
                if check:
                    next_cancel_check = loop.time() + CANCEL_CHECK_S
                entry = Entry(EntryType.CHUNK, text)
                appended = await writer.append(request.id, entry, check_cancel=check)
                chunks += 1
                gap.tick()
                first_ms = first_ms or now_ms()
                if appended.cancel_requested:
                    raise _Cancelled
        finally:
            # Close now, not at garbage collection: it ends the model's HTTP stream.
            await items.aclose()
            await close_stream(stream)
    except _Cancelled:
        await _finish(
            store, request, request_entry_id, Entry(EntryType.CANCELLED), record, chunks, first_ms
        )
        return Status.CANCELLED
    except ProviderError as e:
        log.warning("question %s: model error (%s): %s", request.id, e.kind, e.message)
        entry = Entry(EntryType.ERROR, e.message, {"kind": e.kind})
        await _finish(
            store, request, request_entry_id, entry, record, chunks, first_ms, error=e.message
        )
        return Status.FAILED
    except Exception as e:
        log.exception("question %s: unexpected failure", request.id)
        message = f"tokenrelay failed while answering ({type(e).__name__}); see the worker log"
        entry = Entry(EntryType.ERROR, message, {"kind": "internal"})
        await _finish(
            store, request, request_entry_id, entry, record, chunks, first_ms, error=message
        )
        return Status.FAILED
    end = Entry(
        EntryType.END,
        meta={
            "finish_reason": finish.reason,
            "prompt_tokens": finish.prompt_tokens,
            "completion_tokens": finish.completion_tokens,
        },
    )
    await _finish(
        store,
        request,
        request_entry_id,
        end,
        record,
        chunks,
        first_ms,
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.completion_tokens,
    )
    return Status.DONE


async def _finish(
    store: Store,
    request: QuestionRequest,
    request_entry_id: str | None,
    entry: Entry,
    record: QuestionRecord,
    chunks: int,
    first_ms: int = 0,
    *,
    error: str = "",
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
) -> None:
    ended = now_ms()
    ttft_ms = first_ms - record.created_ms if first_ms else -1
    stats = {"chunks": chunks, "ttft_ms": ttft_ms, "duration_ms": ended - record.created_ms}
    meta = {**entry.meta, **stats}
    fields: dict[str, object] = {
        **stats,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }
    if error:
        fields["error"] = error
    metrics.answer_ended(entry, ttft_ms)
    logs.answer_ended(request.id, entry, fields)
    await store.finish(request.id, Entry(entry.type, entry.text, meta), fields, request_entry_id)


async def fail_undeliverable(
    store: Store, request: QuestionRequest, request_entry_id: str, deliveries: int
) -> None:
    """A request that keeps crashing its workers ends failed instead of looping forever."""
    message = (
        f"gave up after {deliveries} attempts: each worker that took this question "
        "stopped before finishing it"
    )
    try:
        record = await store.record(request.id)
    except LookupError:
        await store.ack(request_entry_id)
        return
    entry = Entry(EntryType.ERROR, message, {"kind": "undeliverable"})
    await _finish(store, request, request_entry_id, entry, record, record.chunks, error=message)
