"""Checks on what clients send, shared by both protocols. Each failure says what to fix."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tokenrelay.errors import InvalidInput
from tokenrelay.keys import is_question_id
from tokenrelay.settings import Settings
from tokenrelay.store import Store
from tokenrelay.wire import entry_id_after, parse_cursor


class NotJson(InvalidInput):
    """A body sent as something other than `application/json` (answered 415)."""


def require_json(content_type: str | None) -> None:
    """NotJson unless the media type is application/json: a page on another site can POST
    text/plain (or no type at all) without asking the browser's CORS preflight."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        shown = repr(media_type[:60]) if media_type else "missing"
        raise NotJson(f"the body must be sent as Content-Type: application/json (got {shown})")


@dataclass(frozen=True, slots=True)
class AskInput:
    topic: str
    question: str
    stream: bool = True


def _text(
    payload: Mapping[str, object], name: str, limit: int, *, default: str | None = None
) -> str:
    value = payload.get(name, default)
    if value is None:
        raise InvalidInput(f"'{name}' is required")
    if not isinstance(value, str):
        raise InvalidInput(f"'{name}' must be a string, not {type(value).__name__}")
    value = value.strip()
    if not value:
        raise InvalidInput(f"'{name}' must not be empty")
    if len(value) > limit:
        raise InvalidInput(f"'{name}' is {len(value)} characters; the limit is {limit}")
    if "\x00" in value:
        raise InvalidInput(f"'{name}' must not contain NUL characters")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError as e:
            # JSON's "\ud800" escapes decode to lone surrogates, which no UTF-8 store takes.
            raise InvalidInput(
                f"'{name}' holds a lone surrogate (character {e.start}): not valid Unicode text"
            ) from e
    return value


def _mapping(payload: object) -> Mapping[str, object]:
    if not isinstance(payload, Mapping):
        raise InvalidInput(f"expected a JSON object, got {type(payload).__name__}")
    return payload


def ask_input(
    payload: object,
    settings: Settings,
    *,
    question_field: str = "question",
    default_topic: str | None = "Redis",
) -> AskInput:
    data = _mapping(payload)
    stream = data.get("stream", True)
    if not isinstance(stream, bool):
        raise InvalidInput("'stream' must be true or false")
    return AskInput(
        _text(data, "topic", settings.max_topic_chars, default=default_topic),
        _text(data, question_field, settings.max_question_chars),
        stream,
    )


def idempotency_key(value: object) -> str | None:
    """An Idempotency-Key (HTTP header, Socket.IO `request_id`): 1 to 255 printable ASCII
    characters, or None when absent."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"an idempotency key must be a string, not {type(value).__name__}")
    if not 0 < len(value) <= 255 or not value.isascii() or not value.isprintable():
        raise InvalidInput("an idempotency key is 1 to 255 printable ASCII characters")
    return value


def question_id(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"'id' must be a string, not {type(value).__name__}")
    if not is_question_id(value):
        raise InvalidInput(f"{value[:40]!r} is not a question id")
    return value


def watch_input(payload: object) -> tuple[str, str]:
    data = _mapping(payload)
    after = data.get("after")
    if after is not None and not isinstance(after, str):
        raise InvalidInput("'after' must be an entry ID string like '1700000000000-0'")
    return question_id(data.get("id")), parse_cursor(after)


async def reachable_cursor(store: Store, question_id: str, cursor: str) -> str:
    """`cursor`, unless it lies past the answer's last entry: nothing would ever follow it,
    and a watch from there would wait forever."""
    if cursor != "0-0":
        last = await store.last_entry_id(question_id)
        if entry_id_after(cursor, last):
            raise InvalidInput(
                f"cursor {cursor!r} is past this answer's last entry {last!r}; "
                "resume after an entry ID you received"
            )
    return cursor
