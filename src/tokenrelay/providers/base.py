"""The provider interface: an async iterator of text chunks, then one Finish."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from tokenrelay.wire import Turn

__all__ = [
    "CONTINUE_INSTRUCTION",
    "Finish",
    "Item",
    "Prompt",
    "Provider",
    "Reasoning",
    "ToolCall",
    "Turn",
    "Waiting",
]

# The seed's prompt: the model is an expert on the topic; the question is the human turn.
SYSTEM_PROMPT = (
    "You are an expert in answering questions about {topic}.\n"
    'All questions are about particular topic "{topic}".\n'
    "Make sure your answer is related to {topic}."
)


# Sent after a cut-off answer (given as the assistant's turn) to have the model go on.
CONTINUE_INSTRUCTION = (
    "Your answer above was cut off. Continue it exactly where it stopped: do not repeat "
    "anything already written and do not comment on the interruption."
)


@dataclass(frozen=True, slots=True)
class Prompt:
    topic: str
    question: str
    # Earlier turns of the conversation, oldest first (a thread, or the front door's messages).
    history: tuple[Turn, ...] = ()
    # The start of an answer a stopped worker wrote: the model continues it, not restarts.
    partial: str = ""
    # Sampling options the asker chose (temperature, top_p, max_tokens, stop, seed, ...).
    options: dict[str, Any] = field(default_factory=dict)
    # Who asked (an API key's fingerprint, else an IP): a model that answers one question
    # at a time serves callers in turn.
    caller: str = ""

    @property
    def system(self) -> str:
        return SYSTEM_PROMPT.format(topic=self.topic)

    def chat(self) -> list[dict[str, Any]]:
        """The chat messages: the seed's system prompt (unless the history brings its own),
        the history, the question, and, to continue a cut-off answer, that answer as the
        assistant's turn followed by the instruction to go on."""
        messages: list[dict[str, Any]] = [t.message() for t in self.history]
        if not any(t.role == "system" for t in self.history):
            messages.insert(0, {"role": "system", "content": self.system})
        messages.append({"role": "user", "content": self.question})
        if self.partial:
            messages.append({"role": "assistant", "content": self.partial})
            messages.append({"role": "user", "content": CONTINUE_INSTRUCTION})
        return messages


@dataclass(frozen=True, slots=True)
class Finish:
    """The last thing a provider yields: why it stopped and what it cost."""

    reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Reasoning:
    """Text a reasoning model streams before its answer (`reasoning_content`)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A piece of a tool call the model streams (OpenAI's `delta.tool_calls[i]`): the first
    piece of a call names its `id` and function `name`, later ones add to `arguments`."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Waiting:
    """Yielded while a generation waits its turn (a local model answers one at a time).

    `ahead` counts the generations before this one. Waiting does not count toward the
    first-token timeout, so a provider that queues yields this every few seconds.
    """

    ahead: int


# What a provider streams: answer text, then one Finish; Waiting while it queues; a reasoning
# model's thoughts and tool calls as the model makes them.
Item = str | Finish | Waiting | Reasoning | ToolCall


class Provider(Protocol):
    """A model. A provider that cannot continue a cut-off answer from `Prompt.partial` (a
    LangChain chain that takes only topic and question) says so with `continues = False`:
    the worker then regenerates and skips what was already written."""

    """A model that streams an answer. Failures raise `ProviderError`."""

    @property
    def name(self) -> str: ...

    @property
    def model(self) -> str: ...

    def stream(self, prompt: Prompt) -> AsyncIterator[Item]: ...

    async def aclose(self) -> None: ...
