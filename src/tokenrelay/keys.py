"""Every Redis key, stream and group name tokenrelay uses. No key is built elsewhere.

Layout (prefix `tokenrelay:` by default), single node:

    {prefix}requests                  stream   one entry per question, consumer group `workers`
    {prefix}{s:<tag>}:requests        stream   request shard <n> instead, when there are several
    {prefix}{q:<id>}:answer           stream   the answer's typed entries (start, chunk, end, ...)
    {prefix}{q:<id>}:question         hash     the question record, readable in Redis Insight
    {prefix}history                   zset     question ids scored by creation time (ms)
    {prefix}caller:{c:<hash>}:asks    zset     a caller's unfinished question ids (per-caller cap)
    {prefix}sweep-lock                string   one worker at a time looks for lost requests
    {prefix}idem:{i:<hash>}           string   "<question id> <body digest>" of an Idempotency-Key

The `{q:<id>}` hash tag puts a question's answer and record in one Redis Cluster
slot, so the worker can write both in one script.

Cluster mode: a question's answer and record are `{prefix}{s:<tag>}:<id>:answer` and
`...:question`, where `<tag>` is the id's first two characters, and the id was drawn
so that they name one of the request shards. A shard is then one hash slot holding its
request stream and the answers of its questions: a blocking XREAD or XREADGROUP may only
name keys of one slot (even on one node, a cluster answers CROSSSLOT), so a gateway
reads all the answers it watches with one connection per shard, not one per answer.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import re
import secrets
from dataclasses import dataclass

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

WORKER_GROUP = "workers"
ID_BYTES = 16
# token_urlsafe(16) gives 22 characters of [A-Za-z0-9_-]: 128 bits, unguessable.
# fullmatch, not match: `$` also matches before a trailing newline.
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}")


# token_urlsafe's alphabet: a shard tag is two of its characters (64 * 64 possible tags).
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# A tag starts a question id: never with '-', which a command line reads as an option.
_TAGS = [a + b for a in _ALPHABET if a != "-" for b in _ALPHABET]
MAX_SHARDS = len(_TAGS)


def new_question_id() -> str:
    """22 URL-safe characters, never starting with '-' (a command line would take the id for
    an option: `tokenrelay watch -x...`)."""
    while (question_id := secrets.token_urlsafe(ID_BYTES)).startswith("-"):
        pass
    return question_id


@functools.cache
def shard_tags(shards: int) -> tuple[str, ...]:
    """The two-character tag of each shard: for shard n, the tag whose hash slot is nearest
    the middle of the n-th of `shards` equal slot ranges, so that shards spread evenly over
    the masters of a cluster whose slots are split in equal ranges (valkey-cli's default)."""
    by_slot = sorted((key_slot(f"s:{tag}".encode()), tag) for tag in _TAGS)
    slots = [slot for slot, _ in by_slot]
    chosen: list[str] = []
    taken: set[int] = set()
    for n in range(shards):
        want = (2 * n + 1) * REDIS_CLUSTER_HASH_SLOTS // (2 * shards)
        at = bisect.bisect_left(slots, want)
        # The nearest tag not taken yet, looking outward from `want`.
        candidates = (
            i
            for d in range(len(slots) + 1)
            for i in (at - d, at + d)
            if 0 <= i < len(slots) and i not in taken
        )
        best = min(itertools.islice(candidates, 2), key=lambda i: abs(slots[i] - want))
        chosen.append(by_slot[best][1])
        taken.add(best)
    return tuple(chosen)


def is_question_id(value: str) -> bool:
    return ID_PATTERN.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix, for `shards` request streams; `cluster`: a question's keys
    live in its shard's slot."""

    prefix: str = "tokenrelay:"
    shards: int = 1
    cluster: bool = False

    @property
    def requests(self) -> str:
        """The first (with one shard, the only) request stream."""
        return self.request_shard(0)

    def request_shard(self, shard: int) -> str:
        if self.shards == 1 and not self.cluster:
            return f"{self.prefix}requests"
        return f"{self.prefix}{{s:{shard_tags(self.shards)[shard]}}}:requests"

    @property
    def request_shards(self) -> list[str]:
        return [self.request_shard(n) for n in range(self.shards)]

    def new_question_id(self) -> str:
        """A fresh id; in cluster mode its first two characters are a shard's tag."""
        question_id = new_question_id()
        if not self.cluster:
            return question_id
        tag = shard_tags(self.shards)[secrets.randbelow(self.shards)]
        return tag + question_id[2:]  # 120 random bits left: still unguessable

    def shard_of(self, question_id: str) -> int:
        """The request shard a question is queued in."""
        if self.shards == 1:
            return 0
        tags = shard_tags(self.shards)
        tag = question_id[:2]
        if tag in tags:
            return tags.index(tag)
        # An id drawn for another number of shards (or single-node): spread by its tag.
        return (_ALPHABET.find(tag[:1]) * 64 + _ALPHABET.find(tag[1:2])) % self.shards

    @property
    def history(self) -> str:
        return f"{self.prefix}history"

    def caller_asks(self, caller: str) -> str:
        """Sorted set of a caller's unfinished question ids (scored by ask time). The caller
        (an API key's fingerprint or an IP address) is hashed: no key material in key names."""
        digest = hashlib.sha256(caller.encode()).hexdigest()[:16]
        return f"{self.prefix}caller:{{c:{digest}}}:asks"

    def idempotency(self, caller: str, key: str) -> str:
        """The question an Idempotency-Key of this caller made (both hashed into the name)."""
        digest = hashlib.sha256(f"{caller}\0{key}".encode()).hexdigest()[:32]
        return f"{self.prefix}idem:{{i:{digest}}}"

    @property
    def written(self) -> str:
        """The doorbell (single node): a Pub/Sub channel, not a key. Each write of answer
        entries publishes there which answer streams it added to, with the entries, as JSON
        (store/answers.py, _RING). Named for its format: a gateway of the version before,
        which read netstrings on `written`, hears nothing from newer workers instead of
        messages it cannot read, and reads their entries by its sweep."""
        return f"{self.prefix}written:json"

    @property
    def sweep_lock(self) -> str:
        return f"{self.prefix}sweep-lock"

    def _of(self, question_id: str) -> str:
        if self.cluster:
            return f"{self.prefix}{{s:{question_id[:2]}}}:{question_id}"
        return f"{self.prefix}{{q:{question_id}}}"

    def answer(self, question_id: str) -> str:
        return f"{self._of(question_id)}:answer"

    def question(self, question_id: str) -> str:
        return f"{self._of(question_id)}:question"

    def question_id_of(self, answer_key: str) -> str:
        """The question id inside an answer stream's key."""
        if self.cluster:
            return answer_key[: -len(":answer")].rsplit(":", 1)[1]
        start = answer_key.index("{q:") + 3
        return answer_key[start : answer_key.index("}", start)]

    def slot_tag(self, key: str) -> str:
        """The hash tag of a key (what decides its cluster slot), "" without one."""
        start = key.find("{")
        end = key.find("}", start + 1)
        return key[start + 1 : end] if start >= 0 and end > start + 1 else ""
