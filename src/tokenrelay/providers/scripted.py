"""Fixed text at a fixed rate, for tests and benchmarks. Never chosen silently."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from tokenrelay.providers.base import Finish, Prompt

_TOKEN = re.compile(r"\s*\S+")


def split_tokens(text: str) -> list[str]:
    """Word-sized pieces that join back to exactly `text` (leading spaces kept)."""
    pieces = _TOKEN.findall(text)
    tail = text[sum(map(len, pieces)) :]
    if tail:
        pieces.append(tail)
    return pieces


class ScriptedProvider:
    def __init__(self, text: str, rate_per_s: float) -> None:
        self._tokens = split_tokens(text)
        self._interval_s = 1.0 / rate_per_s

    @property
    def name(self) -> str:
        return "scripted"

    @property
    def model(self) -> str:
        return "scripted"

    @property
    def continues(self) -> bool:
        """Fixed text cannot continue another answer: it is said again from the start, and
        the worker skips what was already written (or writes `restart` if it differs)."""
        return False

    async def stream(self, prompt: Prompt) -> AsyncIterator[str | Finish]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, token in enumerate(self._tokens):
            # Pace against the start time, not the previous sleep, so drift never adds up.
            delay = start + (i + 1) * self._interval_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            yield token
        yield Finish("stop", len(prompt.question.split()), len(self._tokens))

    async def aclose(self) -> None:
        return None
