"""What a question brings besides its text: the conversation before it and sampling options.

Two sources: the OpenAI front door's `messages` and options, passed through as the caller
sent them (within limits), and threads — a question that follows an earlier answer gets
the thread's earlier questions and answers, oldest trimmed first to the budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenrelay.errors import InvalidInput
from tokenrelay.gateway.access import Access, Caller
from tokenrelay.gateway.answers import attach
from tokenrelay.gateway.inputs import question_id
from tokenrelay.services import Services
from tokenrelay.store import answer_text
from tokenrelay.wire import Context, Status, Turn

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 200
MAX_THREAD_TURNS = 50  # earlier questions a thread looks back over, at most
MAX_STOPS = 4

# name: (type, lowest, highest)
_NUMBERS: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "presence_penalty": (float, -2.0, 2.0),
    "frequency_penalty": (float, -2.0, 2.0),
    "max_tokens": (int, 1, 1_000_000),
    "max_completion_tokens": (int, 1, 1_000_000),
    "seed": (int, -(2**63), 2**63 - 1),
}
SAMPLING = (*_NUMBERS, "stop")
# Tool use, passed to the model as sent (the model validates the schemas).
TOOLS = ("tools", "tool_choice", "parallel_tool_calls")
MAX_TOOLS = 128


def sampling_options(body: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling options in `body`, checked; InvalidInput names the first bad one."""
    out: dict[str, Any] = {}
    for name, (kind, low, high) in _NUMBERS.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(f"'{name}' must be a number")
        if kind is int and not isinstance(value, int):
            raise InvalidInput(f"'{name}' must be an integer")
        if not low <= value <= high:
            raise InvalidInput(f"'{name}' must be between {low:g} and {high:g}")
        out[name] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise InvalidInput("'stop' must be a string or a list of strings")
        if len(stops) > MAX_STOPS:
            raise InvalidInput(f"'stop' takes at most {MAX_STOPS} strings")
        out["stop"] = stops
    return out | _tool_options(body)


def _tool_options(body: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools):
            raise InvalidInput("'tools' must be a list of objects")
        if len(tools) > MAX_TOOLS:
            raise InvalidInput(f"'tools' takes at most {MAX_TOOLS} tools")
        out["tools"] = tools
    choice = body.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, str | Mapping):
            raise InvalidInput("'tool_choice' must be a string or an object")
        out["tool_choice"] = choice
    parallel = body.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise InvalidInput("'parallel_tool_calls' must be true or false")
        out["parallel_tool_calls"] = parallel
    return out


def _content(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts: text ones only
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise InvalidInput(f"messages[{index}]: only text content parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidInput(f"messages[{index}]: a text part needs 'text'")
            texts.append(text)
        content = "".join(texts)
    if content is None and message.get("role") == "assistant":
        content = ""  # an assistant turn that only called tools
    if not isinstance(content, str):
        raise InvalidInput(f"messages[{index}]: 'content' must be text or text parts")
    return content


def _tool_fields(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    """What tool use adds to a message: an assistant's calls, a tool result's call id."""
    extra: dict[str, Any] = {}
    calls = message.get("tool_calls")
    if calls is not None:
        if message.get("role") != "assistant" or not isinstance(calls, list):
            raise InvalidInput(f"messages[{index}]: 'tool_calls' is a list, on assistant turns")
        extra["tool_calls"] = calls
    for name in ("tool_call_id", "name"):
        value = message.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise InvalidInput(f"messages[{index}]: '{name}' must be a string")
            extra[name] = value
    return extra


def messages_input(messages: object, budget_chars: int) -> tuple[tuple[Turn, ...], str]:
    """(the turns before the question, the question): the question is the last message,
    which must be the user's. Turns past `budget_chars` are dropped oldest first (system
    messages are kept)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("'messages' must be a non-empty list")
    if len(messages) > MAX_MESSAGES:
        raise InvalidInput(
            f"'messages' holds {len(messages)} messages; the limit is {MAX_MESSAGES}"
        )
    turns: list[Turn] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidInput(f"messages[{index}] must be an object")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidInput(f"messages[{index}]: 'role' must be one of {', '.join(ROLES)}")
        turns.append(Turn(str(role), _content(message, index), _tool_fields(message, index)))
    last = turns.pop()
    if last.role != "user":
        raise InvalidInput("'messages' needs a user message last: it is the question")
    return trimmed(turns, budget_chars), last.content


def trimmed(turns: list[Turn], budget_chars: int) -> tuple[Turn, ...]:
    """`turns` within `budget_chars` of content: system turns kept, the oldest others
    dropped first."""
    kept = list(turns)
    size = sum(len(t.content) for t in kept)
    while size > budget_chars:
        oldest = next((i for i, t in enumerate(kept) if t.role != "system"), None)
        if oldest is None:
            break
        size -= len(kept.pop(oldest).content)
    return tuple(kept)


async def thread_history(
    svc: Services, access: Access, who: Caller, follows: str, budget_chars: int
) -> tuple[tuple[Turn, ...], str]:
    """The earlier questions and answers of the thread that `follows` ends, oldest first
    and within the budget, and the thread's id (its first question's)."""
    turns: list[Turn] = []
    size, thread, current = 0, follows, follows
    for _ in range(MAX_THREAD_TURNS):
        record, _ = await attach(svc, access, who, current)
        if current == follows and record.status is not Status.DONE:
            raise InvalidInput(
                f"question {follows!r} is {record.status.value}: follow up an answer that is done"
            )
        thread = record.thread or record.id
        text = answer_text(await svc.store.read_all(record.id))
        size += len(record.question) + len(text)
        turns[:0] = [Turn("user", record.question), Turn("assistant", text)]
        if not record.follows or size > budget_chars:
            break
        current = record.follows
    return trimmed(turns, budget_chars), thread


async def follow_up(svc: Services, access: Access, who: Caller, follows: object) -> Context | None:
    """The context of a question asked in a thread (None when it follows nothing)."""
    if follows is None:
        return None
    followed = question_id(follows)
    history, thread = await thread_history(svc, access, who, followed, svc.settings.context_chars)
    return Context(history=history, follows=followed, thread=thread)
