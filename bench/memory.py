"""Redis memory per finished answer, and proof that retention removes it."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import aiohttp

from bench.spec import question_for
from bench.stack import Stack

# Paced, so that each token is its own entry (the largest stream): a worker coalesces
# chunks into one entry only while a write is still on its way.
RATE = 100.0
# An answer that has not ended by then never will: the benchmark stops, saying so.
ASK_TIMEOUT_S = 120.0


async def measure_memory(
    stack: Stack, answers: int, tokens: int, rate: float = RATE
) -> dict[str, Any]:
    """Ask `answers` questions of `tokens` tokens, wait for each to end, then read
    MEMORY USAGE (exact: SAMPLES 0) of its answer stream and record, and their TTL.
    `check_gone` later says whether retention removed them."""
    assert stack.http is not None and stack.redis is not None
    redis, keys = stack.redis, stack.keys

    async def ask() -> str:
        body = {"question": question_for(secrets.token_hex(8), tokens, rate), "stream": False}
        assert stack.http is not None
        try:
            async with stack.http.post(
                f"{stack.gateway_url}/api/questions",
                json=body,
                timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT_S),
            ) as resp:
                reply: Any = await resp.json()
        except TimeoutError as e:
            raise RuntimeError(f"memory check: no whole answer within {ASK_TIMEOUT_S:g} s") from e
        if reply.get("status") != "done":
            raise RuntimeError(f"memory check: the answer did not finish: {reply}")
        return str(reply["id"])

    ids = await asyncio.gather(*(ask() for _ in range(answers)))
    sizes, chunks, ttls = [], [], []
    for qid in ids:
        stream: Any = await redis.memory_usage(keys.answer(qid), samples=0)
        record: Any = await redis.memory_usage(keys.question(qid), samples=0)
        sizes.append((int(stream), int(record)))
        chunks.append(int(await redis.xlen(keys.answer(qid))))
        ttls.append(int(await redis.ttl(keys.answer(qid))))
    n = len(sizes)
    stream_b = sum(s for s, _ in sizes) / n
    record_b = sum(r for _, r in sizes) / n
    return {
        "answers": n,
        "tokens": tokens,
        "rate": rate,
        "entries_per_answer": round(sum(chunks) / n, 1),
        "stream_bytes": round(stream_b),
        "record_bytes": round(record_b),
        "total_bytes": round(stream_b + record_b),
        "ttl_s_when_finished": max(ttls),
        "retention_s": stack.config.retention_s,
        "finished_at": time.time(),
        "ids": ids,
        "gone_after_s": None,
    }


async def check_gone(stack: Stack, figures: dict[str, Any], slack_s: float = 15.0) -> None:
    """Record when both keys of every measured answer were gone (seen no later than now,
    when the sweep outlasted the retention); `gone_after_s` stays None if any is still
    there once retention (+ slack) has passed."""
    assert stack.redis is not None
    redis, keys = stack.redis, stack.keys
    deadline = figures["finished_at"] + figures["retention_s"] + slack_s
    while True:
        remaining = 0
        for qid in figures["ids"]:
            remaining += int(await redis.exists(keys.answer(qid), keys.question(qid)))
        if remaining == 0:
            figures["gone_after_s"] = round(time.time() - figures["finished_at"], 1)
            break
        if time.time() >= deadline:
            break
        await asyncio.sleep(0.25)
    figures.pop("ids", None)
