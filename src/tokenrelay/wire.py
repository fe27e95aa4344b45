"""The wire format: typed records <-> Redis stream fields and hashes <-> JSON events.

Every answer entry has the same two fields, `type` and `data`, so Redis stores
the field names once per stream node instead of once per entry. `data` is the
raw text for a chunk and a JSON object for every other type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from tokenrelay.errors import InvalidInput


class EntryType(StrEnum):
    START = "start"
    CHUNK = "chunk"
    END = "end"
    ERROR = "error"
    CANCELLED = "cancelled"
    # The answer waits for the model (a local model answers one question at a time).
    WAITING = "waiting"
    # A reclaimed request whose new generation diverged from the partial answer:
    # viewers drop the text they have and keep reading.
    RESTART = "restart"
    # What a reasoning model thinks before it answers (`reasoning_content`), kept apart from
    # the answer's text.
    REASONING = "reasoning"
    # A piece of a tool call the model makes: index, id and name (first piece), arguments.
    TOOL_CALL = "tool_call"


TERMINAL_TYPES = frozenset({EntryType.END, EntryType.ERROR, EntryType.CANCELLED})


class Status(StrEnum):
    QUEUED = "queued"
    STREAMING = "streaming"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED_STATUSES = frozenset({Status.DONE, Status.FAILED, Status.CANCELLED})
STATUS_OF_TERMINAL = {
    EntryType.END: Status.DONE,
    EntryType.ERROR: Status.FAILED,
    EntryType.CANCELLED: Status.CANCELLED,
}


class RecordField:
    """Field names of the question record (a hash) that more than one module reads or writes."""

    TOPIC = "topic"
    QUESTION = "question"
    STATUS = "status"
    CREATED_MS = "created_ms"
    OWNER = "owner"  # the asking API key's fingerprint
    CALLER = "caller"  # who the per-caller cap counts this question for
    REQUEST_ID = "request_id"  # its entry in the request stream
    EPOCH = "epoch"  # the current delivery: only its worker may write the answer
    FOLLOWS = "follows"  # in a thread: the question this one follows
    THREAD = "thread"  # in a thread: its first question's id
    CONVERSATION = "conversation"  # the turns the model was given before the question (JSON)
    CANCEL = "cancel"  # "1" while a cancel waits for the worker to see it
    FIRST_ENTRY_ID = "first_entry_id"
    LAST_ENTRY_ID = "last_entry_id"


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _loads_object(raw: str) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of an answer stream. `entry_id` is "" until Redis assigns one."""

    type: EntryType
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    entry_id: str = ""

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    def fields(self) -> dict[str, str]:
        """The Redis fields XADD writes."""
        if self.type is EntryType.CHUNK:
            return {"type": self.type.value, "data": self.text}
        body = dict(self.meta)
        if self.text:
            body["text"] = self.text
        return {"type": self.type.value, "data": dumps(body)}

    @classmethod
    def from_fields(cls, entry_id: str, fields: dict[str, str]) -> Entry:
        kind = EntryType(fields.get("type", EntryType.CHUNK.value))
        data = fields.get("data", "")
        if kind is EntryType.CHUNK:
            return cls(kind, data, entry_id=entry_id)
        meta = _loads_object(data)
        text = str(meta.pop("text", ""))
        return cls(kind, text, meta, entry_id)

    @classmethod
    def from_flat(cls, entry_id: str, flat: list[str]) -> Entry:
        """From a raw reply's `[field, value, field, value, ...]`. A chunk as the worker
        writes it (most entries a gateway reads) is taken as it is: 0.9 instead of 2.9 us."""
        if len(flat) == 4 and flat[1] == "chunk" and flat[0] == "type" and flat[2] == "data":
            return cls(EntryType.CHUNK, flat[3], entry_id=entry_id)
        it = iter(flat)
        return cls.from_fields(entry_id, dict(zip(it, it, strict=True)))

    def event(self, question_id: str) -> dict[str, Any]:
        """The JSON object a client receives (Socket.IO `answer`, SSE `data:`)."""
        out: dict[str, Any] = {
            "id": question_id,
            "entry_id": self.entry_id,
            "type": self.type.value,
        }
        out.update(self.meta)
        out["text"] = self.text
        return out


@dataclass(frozen=True, slots=True)
class Turn:
    """One earlier message of a conversation: role is system, user, assistant or tool.
    `extra` keeps what tool use needs: an assistant's `tool_calls`, a tool's
    `tool_call_id` (and `name`)."""

    role: str
    content: str
    extra: dict[str, Any] = field(default_factory=dict)

    def message(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content, **self.extra}

    def pack(self) -> list[Any]:
        return [self.role, self.content, self.extra] if self.extra else [self.role, self.content]

    @classmethod
    def unpack(cls, packed: list[Any]) -> Turn:
        extra = packed[2] if len(packed) > 2 and isinstance(packed[2], dict) else {}
        return cls(str(packed[0]), str(packed[1]), extra)


@dataclass(frozen=True, slots=True)
class Context:
    """What a question brings besides its text: the conversation before it (a thread's earlier
    turns, or the front door's messages), sampling options for the model, and in a thread,
    the answer it follows and the thread's first question."""

    history: tuple[Turn, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    follows: str = ""
    thread: str = ""


@dataclass(frozen=True, slots=True)
class QuestionRequest:
    """One entry of the request stream: what a worker needs to answer."""

    id: str
    topic: str
    question: str
    model: str = ""
    history: tuple[Turn, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, str]:
        out = {"id": self.id, "topic": self.topic, "question": self.question, "model": self.model}
        if self.history:  # only when there is one: most requests stay four short fields
            out["history"] = dumps([t.pack() for t in self.history])
        if self.options:
            out["options"] = dumps(self.options)
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> QuestionRequest:
        history = fields.get("history")
        turns = orjson.loads(history) if history else []
        return cls(
            fields.get("id", ""),
            fields.get("topic", ""),
            fields.get("question", ""),
            fields.get("model", ""),
            tuple(Turn.unpack(packed) for packed in turns),
            _loads_object(fields["options"]) if fields.get("options") else {},
        )


@dataclass(frozen=True, slots=True)
class QuestionRecord:
    """The question hash, as read back. Unknown or missing fields default safely."""

    id: str
    topic: str
    question: str
    status: Status
    created_ms: int
    started_ms: int = 0
    ended_ms: int = 0
    model: str = ""
    provider: str = ""
    first_entry_id: str = ""
    last_entry_id: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: int = 0
    ttft_ms: int = -1
    error: str = ""
    cancel_requested: bool = False
    caller: str = ""
    request_id: str = ""
    owner: str = ""  # an API key's fingerprint: who may watch and cancel it ("" anyone)
    follows: str = ""
    thread: str = ""

    @classmethod
    def from_hash(cls, question_id: str, h: dict[str, str]) -> QuestionRecord:
        def num(name: str, default: int = 0) -> int:
            try:
                return int(h.get(name, default))
            except ValueError:
                return default

        try:
            status = Status(h.get("status", Status.QUEUED.value))
        except ValueError:
            status = Status.FAILED
        return cls(
            id=question_id,
            topic=h.get("topic", ""),
            question=h.get("question", ""),
            status=status,
            created_ms=num("created_ms"),
            started_ms=num("started_ms"),
            ended_ms=num("ended_ms"),
            model=h.get("model", ""),
            provider=h.get("provider", ""),
            first_entry_id=h.get(RecordField.FIRST_ENTRY_ID, ""),
            last_entry_id=h.get(RecordField.LAST_ENTRY_ID, ""),
            prompt_tokens=num("prompt_tokens"),
            completion_tokens=num("completion_tokens"),
            chunks=num("chunks"),
            ttft_ms=num("ttft_ms", -1),
            error=h.get("error", ""),
            cancel_requested=h.get(RecordField.CANCEL, "") == "1",
            caller=h.get(RecordField.CALLER, ""),
            request_id=h.get(RecordField.REQUEST_ID, ""),
            owner=h.get(RecordField.OWNER, ""),
            follows=h.get(RecordField.FOLLOWS, ""),
            thread=h.get(RecordField.THREAD, ""),
        )

    def public(self) -> dict[str, Any]:
        """The record as the API shows it."""
        return {
            "id": self.id,
            "topic": self.topic,
            "question": self.question,
            "status": self.status.value,
            "created_ms": self.created_ms,
            "started_ms": self.started_ms or None,
            "ended_ms": self.ended_ms or None,
            "model": self.model or None,
            "provider": self.provider or None,
            "first_entry_id": self.first_entry_id or None,
            "last_entry_id": self.last_entry_id or None,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "chunks": self.chunks,
            "ttft_ms": self.ttft_ms if self.ttft_ms >= 0 else None,
            "error": self.error or None,
            "follows": self.follows or None,
            "thread": self.thread or None,
        }


_ENTRY_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
MAX_ID_PART = 2**64 - 1


def parse_cursor(value: str | None) -> str:
    """A client's resume cursor: "" or "0" means from the start, else a stream entry ID."""
    if value is None or value in ("", "0", "0-0"):
        return "0-0"
    value = value.strip()
    # ASCII digits only (str.isdigit also takes superscripts and Arabic-Indic digits), each
    # part within Redis's 64 bits.
    match = _ENTRY_ID.fullmatch(value)
    if match is not None and all(int(part) <= MAX_ID_PART for part in match.groups()):
        return value
    raise InvalidInput(
        f"malformed cursor {value[:40]!r}: expected a stream entry ID like '1700000000000-0'"
    )


def entry_id_after(a: str, b: str) -> bool:
    """True when entry ID `a` sorts strictly after `b`."""
    ams, _, aseq = a.partition("-")
    bms, _, bseq = b.partition("-")
    return (int(ams), int(aseq or 0)) > (int(bms), int(bseq or 0))
