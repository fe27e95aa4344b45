"""The provider interface: an async iterator of text chunks, then one Finish."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

# The seed's prompt: the model is an expert on the topic; the question is the human turn.
SYSTEM_PROMPT = (
    "You are an expert in answering questions about {topic}.\n"
    'All questions are about particular topic "{topic}".\n'
    "Make sure your answer is related to {topic}."
)


@dataclass(frozen=True, slots=True)
class Prompt:
    topic: str
    question: str

    @property
    def system(self) -> str:
        return SYSTEM_PROMPT.format(topic=self.topic)


@dataclass(frozen=True, slots=True)
class Finish:
    """The last thing a provider yields: why it stopped and what it cost."""

    reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Waiting:
    """Yielded while a generation waits its turn (a local model answers one at a time).

    `ahead` counts the generations before this one. Waiting does not count toward the
    first-token timeout, so a provider that queues yields this every few seconds.
    """

    ahead: int


class Provider(Protocol):
    """A model that streams an answer. Failures raise `ProviderError`."""

    @property
    def name(self) -> str: ...

    @property
    def model(self) -> str: ...

    def stream(self, prompt: Prompt) -> AsyncIterator[str | Finish | Waiting]: ...

    async def aclose(self) -> None: ...
