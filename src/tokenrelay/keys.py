"""Every Redis key, stream and group name tokenrelay uses. No key is built elsewhere.

Layout (prefix `tokenrelay:` by default):

    {prefix}requests                  stream   one entry per question, consumer group `workers`
    {prefix}{q:<id>}:answer           stream   the answer's typed entries (start, chunk, end, ...)
    {prefix}{q:<id>}:question         hash     the question record, readable in Redis Insight
    {prefix}history                   zset     question ids scored by creation time (ms)
    {prefix}caller:{c:<hash>}:asks    zset     a caller's unfinished question ids (per-caller cap)
    {prefix}sweep-lock                string   one worker at a time looks for lost requests

The `{q:<id>}` hash tag puts a question's answer and record in one Redis Cluster
slot, so the worker can write both in one pipeline and MULTI.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

WORKER_GROUP = "workers"
ID_BYTES = 16
# token_urlsafe(16) gives 22 characters of [A-Za-z0-9_-]: 128 bits, unguessable.
# fullmatch, not match: `$` also matches before a trailing newline.
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}")


def new_question_id() -> str:
    return secrets.token_urlsafe(ID_BYTES)


def is_question_id(value: str) -> bool:
    return ID_PATTERN.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix."""

    prefix: str = "tokenrelay:"

    @property
    def requests(self) -> str:
        return f"{self.prefix}requests"

    @property
    def history(self) -> str:
        return f"{self.prefix}history"

    def caller_asks(self, caller: str) -> str:
        """Sorted set of a caller's unfinished question ids (scored by ask time). The caller
        (an API key's fingerprint or an IP address) is hashed: no key material in key names."""
        digest = hashlib.sha256(caller.encode()).hexdigest()[:16]
        return f"{self.prefix}caller:{{c:{digest}}}:asks"

    @property
    def sweep_lock(self) -> str:
        return f"{self.prefix}sweep-lock"

    def answer(self, question_id: str) -> str:
        return f"{self.prefix}{{q:{question_id}}}:answer"

    def question(self, question_id: str) -> str:
        return f"{self.prefix}{{q:{question_id}}}:question"

    def question_id_of(self, answer_key: str) -> str:
        """The question id inside an answer stream's key."""
        start = answer_key.index("{q:") + 3
        return answer_key[start : answer_key.index("}", start)]
