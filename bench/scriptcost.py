"""What the worker's write script costs Valkey, per call and per piece.

Every chunk a worker writes goes through one script (store/answers.py, `_APPEND_MANY`):
the record's epoch and chain checked, the entry added, the record updated, and the
doorbell rung (one `PUBLISH` a call, with the entries, to the gateways listening).
Measured here against a Valkey of its own (or `--redis-url`), from Valkey's own
accounting (`INFO commandstats`, µs per call, without the sockets' reads and writes):

- the script as a worker sends it, one numbered chunk a call, with a subscriber on the
  doorbell (as a gateway is) and without a ring (a cluster's writes);
- its pieces, each run 1,000 times inside one script call so that a call's own cost
  and the machine's noise fall away: the commands it runs, and ways to encode a ring.

`--rounds` rounds, each way once a round; medians. Run it alone with
`python -m bench.scriptcost` (`--help`). To compare with other code, run it with that
code first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.loop import run
from bench.stats import medians_table
from tokenrelay.connection import pooled_client
from tokenrelay.services import make_store, redis_url_for
from tokenrelay.settings import Settings
from tokenrelay.store import Put, Store, next_entry_id
from tokenrelay.wire import Entry, EntryType

_KEY = "scriptcost:{q:x}:answer"
_RING = "{_KEY, '1700000000000-0', '1700000000001-0', 'chunk', 'token '}"
# Each run 1,000 times in one call, less the loop itself.
PIECES = {
    "HMGET of the record (4 fields)": "redis.call('HMGET', 'scriptcost:rec', 'epoch', "
    "'cancel', 'last_entry_id', 'tail')",
    "HSET of the record (2 fields)": "redis.call('HSET', 'scriptcost:rec', 'last_entry_id', "
    "'1-1', 'tail', '1-1')",
    "XLEN": "redis.call('XLEN', _KEY)",
    "XREVRANGE COUNT 1": "redis.call('XREVRANGE', _KEY, '+', '-', 'COUNT', 1)",
    "PUBLISH, nobody listening": "redis.call('PUBLISH', 'scriptcost:nobody', 'x')",
    "a ring as netstrings, in Lua": f"local p = {{}} for _, s in ipairs({_RING}) do "
    "p[#p + 1] = #s .. ':' .. s end local m = table.concat(p)",
    "a ring as JSON, cjson": f"local m = cjson.encode({{{_RING}}})",
}


async def _piece_us(redis: Redis, body: str, rounds: int) -> list[float]:
    script = f"local _KEY = KEYS[1]\nfor _ = 1, 1000 do\n{body}\nend\nreturn 1"
    sha = await redis.script_load(script)
    per: list[float] = []
    for _ in range(rounds):
        await redis.config_resetstat()
        for _ in range(10):
            await redis.evalsha(sha, 1, _KEY)
        per.append(await _evalsha_us(redis) / 1000)
    return per


async def _evalsha_us(redis: Redis) -> float:
    stats: Any = await redis.info("commandstats")
    return float(stats["cmdstat_evalsha"]["usec_per_call"])


async def _writes_us(store: Store, redis: Redis, question: str, calls: int) -> float:
    """µs per call of the write script, one numbered chunk a call, in a chain."""
    epoch, last = await store.begin_answer(question)
    ms = 1_700_000_000_000
    await redis.config_resetstat()
    for n in range(calls):
        entry_id = next_entry_id(last, ms + n)
        put = Put(question, Entry(EntryType.CHUNK, "token "), epoch, entry_id, last)
        (applied,) = await store.write_batch([put])
        assert applied.entry_id == entry_id, applied
        last = entry_id
    return await _evalsha_us(redis)


async def _measure(args: argparse.Namespace) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="tokenrelay-scriptcost-") as tmp:
        settings = Settings(redis_url=args.redis_url, data_dir=Path(tmp))
        async with redis_url_for(settings) as url:
            redis = Redis.from_url(url, decode_responses=True)
            listener = Redis.from_url(url)
            pool = pooled_client(url, size=2, name="scriptcost")
            try:
                await redis.hset("scriptcost:rec", mapping={"epoch": "1"})
                await redis.xadd(_KEY, {"type": "chunk", "data": "x"})
                rung = make_store(settings.model_copy(update={"key_prefix": "sc1:"}), pool)
                unrung = make_store(settings.model_copy(update={"key_prefix": "sc2:"}), pool)
                unrung._doorbell = ""  # as in a cluster: no ring
                pubsub = listener.pubsub()
                await pubsub.subscribe(rung.keys.written)
                for _ in range(args.rounds):
                    for name, store in (("with a listener", rung), ("no ring", unrung)):
                        asked = await store.ask("t", "q")
                        us = await _writes_us(store, redis, asked.id, args.calls)
                        results.setdefault(f"script call, one chunk, {name}", []).append(us)
                        while await pubsub.get_message(timeout=0):
                            pass
                for name, body in PIECES.items():
                    results[name] = await _piece_us(redis, body, args.rounds)
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            finally:
                await pool.aclose()
                await listener.aclose()
                await redis.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scriptcost", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--redis-url", default=None, help="a Valkey/Redis to measure instead")
    parser.add_argument("--calls", type=int, default=1_000, help="script calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; each way once a round")
    args = parser.parse_args()
    results = run(_measure(args))
    title = f"Valkey's CPU (INFO commandstats), median of {args.rounds} rounds:"
    print(medians_table(title, results))


if __name__ == "__main__":
    main()
