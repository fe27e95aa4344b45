"""A LangChain runnable that gets stuck in a blocking call once, for the supervisor tests.

The first generation writes a few words, drops a flag file, then blocks its worker's event
loop (as native code or a synchronous client would). Every later generation answers
normally with the same text, so a reclaimed answer continues where the stuck one stopped.
TOKENRELAY_LANGCHAIN_RUNNABLE=tests.stuck_model:runnable; the flag file is named by
STUCK_MODEL_FLAG.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableGenerator

WORDS = [f"w{n} " for n in range(30)]
STUCK_AFTER = 5


def _get_stuck(flag: Path) -> None:
    flag.write_text("stuck once")
    time.sleep(3600)


async def _answer(_: AsyncIterator[Any]) -> AsyncIterator[str]:
    flag = Path(os.environ["STUCK_MODEL_FLAG"])
    first = not flag.exists()  # noqa: ASYNC240 - one stat, in a test model
    for n, word in enumerate(WORDS):
        if first and n == STUCK_AFTER:
            _get_stuck(flag)  # blocks the event loop: no await can cancel this
        await asyncio.sleep(0.05)
        yield word


runnable: RunnableGenerator[Any, str] = RunnableGenerator(_answer)
