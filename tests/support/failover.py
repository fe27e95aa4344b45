"""What a failover does to an answer, made to happen on one node: a promoted replica that
never received the old master's last writes."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

# KEYS: answer stream, record. ARGV: how many entries. The stream is written anew without
# them (a replica never saw them: its last id is the last entry it has, which XDEL alone
# would not give). Atomic, so that a worker writing at the same moment sees the stream
# either before or after.
_LOSE = """
local n = tonumber(ARGV[1])
local all = redis.call('XRANGE', KEYS[1], '-', '+')
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
local dropped = {}
for i, entry in ipairs(all) do
  if i > #all - n then
    dropped[#dropped + 1] = entry[1]
  else
    redis.call('XADD', KEYS[1], entry[1], unpack(entry[2]))
  end
end
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
redis.call('HSET', KEYS[2], 'last_entry_id', all[#all - n][1])
return dropped
"""


async def lose_last_entries(client: Redis, stream: str, record: str, count: int) -> list[str]:
    """Make an answer stream and its record look as a promoted replica's would when the
    master acknowledged the last `count` entries but died before sending them on: the
    entries gone, the stream's last id and the record's `last_entry_id` back where the
    replica had them (the stream must hold more than `count`). Returns the dropped ids,
    oldest first."""
    dropped: Any = await client.eval(_LOSE, 2, stream, record, count)
    return [str(entry_id) for entry_id in dropped]


__all__ = ["lose_last_entries"]
