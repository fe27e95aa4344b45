"""The wire format: resume cursors, answer entries <-> Redis fields, question records."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from tokenrelay.errors import InvalidInput, TokenRelayError
from tokenrelay.keys import Keys
from tokenrelay.settings import Settings
from tokenrelay.wire import (
    MAX_ID_PART,
    Entry,
    EntryType,
    QuestionRecord,
    QuestionRequest,
    RecordField,
    Status,
    entry_id_after,
    parse_cursor,
)

# -- cursors ----------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "0", "0-0"])
def test_cursor_from_the_start(value: str | None) -> None:
    assert parse_cursor(value) == "0-0"


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("1700000000000-0", "1700000000000-0"),
        ("1-2", "1-2"),
        (" 1700000000000-3\t", "1700000000000-3"),
        (f"{2**64 - 1}-{2**64 - 1}", f"{2**64 - 1}-{2**64 - 1}"),
        (f"0-{2**64 - 1}", f"0-{2**64 - 1}"),
    ],
)
def test_cursor_accepts_entry_ids(value: str, parsed: str) -> None:
    assert parse_cursor(value) == parsed


@pytest.mark.parametrize(
    "value",
    [
        # Non-ASCII digits: str.isdigit() and int() take them, Redis does not.
        "²-0",
        "1-²",
        "\u0661-\u0660",  # Arabic-Indic one, zero
        "\u0661\u0667\u0660\u0660-0",
        "\uff11-0",  # fullwidth digit one
        # Past 64 bits: Redis answers "Invalid stream ID".
        "1-99999999999999999999",
        "99999999999999999999-0",
        f"{2**64}-0",
        f"0-{2**64}",
        "1" * 21 + "-0",
        # Not an entry ID at all.
        "1",
        "1-",
        "-1",
        "1--2",
        "1-2-3",
        "a-b",
        "+1-0",
        "1-+0",
        "1_000-0",
        "1 -0",
        "$",
        ">",
        "+",
        "-",
        "1-2\n3",
        "x" * 1000,
    ],
)
def test_cursor_refuses(value: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_cursor(value)
    # One root and the matching built-in, so both the HTTP layer and callers can catch it.
    assert isinstance(caught.value, TokenRelayError) and isinstance(caught.value, ValueError)
    assert len(str(caught.value)) < 200, "the message echoes at most a prefix of the input"


def test_max_id_part_is_redis_64_bits() -> None:
    assert MAX_ID_PART == 18_446_744_073_709_551_615


async def test_every_accepted_cursor_is_accepted_by_redis(
    redis: Redis, make_settings: Callable[..., Settings]
) -> None:
    """What parse_cursor lets through never becomes a Redis error (a 500, a dead SSE)."""
    key = Keys(make_settings().key_prefix).answer("cursorcheck")
    await redis.xadd(key, {"type": "chunk", "data": "x"}, id="5-5")
    try:
        for raw in ["0", "1-2", "5-5", f"{2**64 - 2}-{2**64 - 1}", f"5-{2**64 - 1}"]:
            cursor = parse_cursor(raw)
            await redis.xrange(key, cursor, "+")
            await redis.xread({key: cursor}, count=1)
    finally:
        await redis.delete(key)


@pytest.mark.parametrize(
    ("a", "b", "after"),
    [
        ("2-0", "1-0", True),
        ("1-0", "2-0", False),
        ("1-1", "1-0", True),
        ("1-0", "1-0", False),
        ("10-0", "9-9", True),  # numeric, not string, order
        ("1-10", "1-9", True),
        (f"{2**64 - 1}-0", f"{2**64 - 2}-{2**64 - 1}", True),
        ("1-0", "0-0", True),
    ],
)
def test_entry_id_order(a: str, b: str, after: bool) -> None:
    assert entry_id_after(a, b) is after


# -- entries ------------------------------------------------------------------

ENTRIES = [
    Entry(EntryType.START, meta={"model": "m", "provider": "scripted", "n": 3}),
    Entry(EntryType.CHUNK, "plain text"),
    Entry(EntryType.CHUNK, ""),
    Entry(EntryType.CHUNK, '{"looks": "like json"}'),
    Entry(EntryType.CHUNK, "ünïcödé 🚀 \n\t<b>html</b>"),
    Entry(EntryType.WAITING, meta={"ahead": 2}),
    Entry(EntryType.RESTART),
    Entry(EntryType.END, meta={"finish_reason": "stop", "usage": {"prompt_tokens": 4}}),
    Entry(EntryType.ERROR, "the model failed: 🚫", {"kind": "provider"}),
    Entry(EntryType.CANCELLED),
]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: f"{e.type.value}:{e.text[:8]}")
def test_entry_fields_round_trip(entry: Entry) -> None:
    fields = entry.fields()
    # Two fields per entry, always the same names: Redis stores them once per stream node.
    assert set(fields) == {"type", "data"}
    assert all(isinstance(v, str) for v in fields.values())
    back = Entry.from_fields("7-1", fields)
    assert back == Entry(entry.type, entry.text, entry.meta, "7-1")
    flat = [part for pair in fields.items() for part in pair]
    assert Entry.from_flat("7-1", flat) == back


def test_chunk_data_is_the_raw_text() -> None:
    assert Entry(EntryType.CHUNK, "héllo").fields() == {"type": "chunk", "data": "héllo"}


async def test_entries_round_trip_through_redis(
    redis: Redis, make_settings: Callable[..., Settings]
) -> None:
    key = Keys(make_settings().key_prefix).answer("wireroundtrip")
    try:
        ids = [str(await redis.xadd(key, e.fields())) for e in ENTRIES]  # type: ignore[arg-type]
        raw: Any = await redis.xrange(key)
    finally:
        await redis.delete(key)
    back = [Entry.from_fields(entry_id, fields) for entry_id, fields in raw]
    assert back == [Entry(e.type, e.text, e.meta, i) for e, i in zip(ENTRIES, ids, strict=True)]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, Entry(EntryType.CHUNK, "", entry_id="1-0")),
        ({"data": "t"}, Entry(EntryType.CHUNK, "t", entry_id="1-0")),
        ({"type": "end"}, Entry(EntryType.END, entry_id="1-0")),
        ({"type": "end", "data": "not json"}, Entry(EntryType.END, entry_id="1-0")),
        ({"type": "end", "data": "[1, 2]"}, Entry(EntryType.END, entry_id="1-0")),
        ({"type": "error", "data": '{"text": 5}'}, Entry(EntryType.ERROR, "5", entry_id="1-0")),
    ],
)
def test_entry_from_fields_tolerates_missing_and_bad_data(
    fields: dict[str, str], expected: Entry
) -> None:
    assert Entry.from_fields("1-0", fields) == expected


def test_terminal_types() -> None:
    terminal = {t for t in EntryType if Entry(t).terminal}
    assert terminal == {EntryType.END, EntryType.ERROR, EntryType.CANCELLED}


def test_event_carries_id_cursor_type_meta_and_text() -> None:
    entry = Entry(EntryType.END, "bye", {"finish_reason": "stop"}, "3-4")
    assert entry.event("q") == {
        "id": "q",
        "entry_id": "3-4",
        "type": "end",
        "finish_reason": "stop",
        "text": "bye",
    }
    # The entry's text wins over a `text` left in meta.
    assert Entry(EntryType.END, "", {"text": "x"}, "3-4").event("q")["text"] == ""
    assert Entry(EntryType.CHUNK, "c", entry_id="5-0").event("q")["entry_id"] == "5-0"


def test_request_fields_round_trip() -> None:
    request = QuestionRequest("abc", "Redis", "What is XADD? ü", "gpt")
    assert QuestionRequest.from_fields(request.fields()) == request
    assert QuestionRequest.from_fields({}) == QuestionRequest("", "", "", "")


# -- question records -----------------------------------------------------------


def test_record_from_full_hash() -> None:
    h = {
        RecordField.TOPIC: "t",
        RecordField.QUESTION: "q",
        RecordField.STATUS: "done",
        RecordField.CREATED_MS: "100",
        "started_ms": "110",
        "ended_ms": "150",
        "model": "m",
        "provider": "p",
        RecordField.FIRST_ENTRY_ID: "1-0",
        RecordField.LAST_ENTRY_ID: "9-0",
        "prompt_tokens": "3",
        "completion_tokens": "8",
        "chunks": "8",
        "ttft_ms": "0",
        "error": "",
        RecordField.OWNER: "someone",
        RecordField.CALLER: "caller-1",
        RecordField.REQUEST_ID: "5-0",
    }
    record = QuestionRecord.from_hash("qid", h)
    assert record == QuestionRecord(
        id="qid",
        topic="t",
        question="q",
        status=Status.DONE,
        created_ms=100,
        started_ms=110,
        ended_ms=150,
        model="m",
        provider="p",
        first_entry_id="1-0",
        last_entry_id="9-0",
        prompt_tokens=3,
        completion_tokens=8,
        chunks=8,
        ttft_ms=0,
        caller="caller-1",
        request_id="5-0",
        owner="someone",
    )
    public = record.public()
    assert public["ttft_ms"] == 0, "a 0 ms first token is a time, not 'unknown'"
    assert not {"owner", "caller"} & set(public), "an API key's fingerprint is never shown"


def test_record_from_empty_hash_defaults_safely() -> None:
    record = QuestionRecord.from_hash("qid", {})
    assert record.status is Status.QUEUED
    assert (record.created_ms, record.chunks, record.ttft_ms) == (0, 0, -1)
    assert record.cancel_requested is False
    public = record.public()
    assert public["ttft_ms"] is None and public["started_ms"] is None
    assert public["first_entry_id"] is None and public["error"] is None


def test_record_tolerates_bad_values() -> None:
    record = QuestionRecord.from_hash(
        "qid",
        {
            RecordField.STATUS: "exploded",
            RecordField.CREATED_MS: "yesterday",
            "chunks": "1.5",
            "ttft_ms": "",
            "unknown_field": "ignored",
        },
    )
    assert record.status is Status.FAILED, "an unknown status is not reported as running"
    assert record.created_ms == 0 and record.chunks == 0 and record.ttft_ms == -1


@pytest.mark.parametrize(("flag", "requested"), [("1", True), ("0", False), ("", False)])
def test_record_cancel_flag(flag: str, requested: bool) -> None:
    record = QuestionRecord.from_hash("qid", {RecordField.CANCEL: flag})
    assert record.cancel_requested is requested
