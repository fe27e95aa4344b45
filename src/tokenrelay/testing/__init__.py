"""Public helpers for your own tests: a mock OpenAI-compatible model server.

`MockLLM` serves the OpenAI chat-completions API over real HTTP with scripted
behaviour (pace, length, exact text, HTTP errors, stalls, malformed or cut streams),
steered by a `directive(...)` in the question. Point tokenrelay at it with
`OPENAI_BASE_URL`, or run it alone: `python -m tokenrelay.testing.mockllm --port 8100`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenrelay.testing.mockllm import (
        MOCK_MODEL,
        MockLLM,
        Script,
        answer_pieces,
        answer_text,
        directive,
    )

__all__ = ["MOCK_MODEL", "MockLLM", "Script", "answer_pieces", "answer_text", "directive"]


def __getattr__(name: str) -> Any:
    # Imported on use, so `python -m tokenrelay.testing.mockllm` runs the module only once.
    if name in __all__:
        from tokenrelay.testing import mockllm

        return getattr(mockllm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
