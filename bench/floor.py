"""The floor under the CPU-per-chunk targets on this machine: one token-sized loopback send.

Every chunk costs tokenrelay at least one TCP write in the worker (to Redis; a batch of
entries shares one) and one per viewer in the gateway (each viewer is its own socket).
Measured here: the sender's own CPU (user + system, `getrusage`) per `send()` of
`--size` bytes on a loopback TCP connection with TCP_NODELAY, as tokenrelay's sockets
are, while another process reads them; and per send on a Unix socket pair for scale. On
loopback the kernel runs the receiving side's TCP work in the sender's system call, so
the figure is what a send costs the process that sends. Run it alone with
`python -m bench.floor` (`--help`).
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import subprocess
import sys
import time

PACED_GAP_S = 0.002
_DRAIN = (
    "import socket,sys\n"
    "s=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\n"
    "while s.recv(1<<20): pass\n"
)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _per_send(sock: socket.socket, message: bytes, sends: int) -> tuple[float, float]:
    """(wall µs, CPU µs) per send, back to back: the reader is always awake."""
    wall, cpu = time.perf_counter(), _cpu_s()
    for _ in range(sends):
        sock.send(message)
    return (time.perf_counter() - wall) * 1e6 / sends, (_cpu_s() - cpu) * 1e6 / sends


def _per_paced_send(
    sock: socket.socket, message: bytes, sends: int, gap_s: float
) -> tuple[float, float]:
    """(wall µs, CPU µs) per send, one every `gap_s`: the reader sleeps between them and
    each send wakes it, as a chunk at 20 tokens/s wakes its viewer's client."""
    wall = cpu = 0.0
    for _ in range(sends):
        time.sleep(gap_s)
        w, c = time.perf_counter(), time.thread_time()
        sock.send(message)
        cpu += time.thread_time() - c
        wall += time.perf_counter() - w
    return wall * 1e6 / sends, cpu * 1e6 / sends


Runs = list[tuple[float, float]]


def _tcp(message: bytes, sends: int, rounds: int) -> tuple[Runs, Runs]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    reader = subprocess.Popen([sys.executable, "-c", _DRAIN, str(server.getsockname()[1])])
    try:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _per_send(conn, message, sends // 10)  # warm up
        seen = [_per_send(conn, message, sends) for _ in range(rounds)]
        paced = [_per_paced_send(conn, message, sends // 25, PACED_GAP_S) for _ in range(rounds)]
        conn.close()
        return seen, paced
    finally:
        server.close()
        reader.wait(timeout=30)


def _unix(message: bytes, sends: int, rounds: int) -> tuple[Runs, Runs]:
    mine, theirs = socket.socketpair()
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket,sys\ns=socket.socket(fileno=int(sys.argv[1]))\n"
            "while s.recv(1<<20): pass\n",
            str(theirs.fileno()),
        ],
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    try:
        _per_send(mine, message, sends // 10)
        seen = [_per_send(mine, message, sends) for _ in range(rounds)]
        paced = [_per_paced_send(mine, message, sends // 25, PACED_GAP_S) for _ in range(rounds)]
        return seen, paced
    finally:
        mine.close()
        reader.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.floor", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--size", type=int, default=60, help="bytes per send (a chunk's frame)")
    parser.add_argument("--sends", type=int, default=50_000, help="sends per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    message = b"x" * args.size
    print(f"{args.size}-byte sends, median of {args.rounds} rounds (µs per send)")
    print(f"{'socket':<28} {'how':<34} {'wall':>6} {'CPU':>6}")
    for name, (back_to_back, paced) in (
        ("loopback TCP, TCP_NODELAY", _tcp(message, args.sends, args.rounds)),
        ("Unix socket pair", _unix(message, args.sends, args.rounds)),
    ):
        for how, runs in (
            (f"back to back ({args.sends} a round)", back_to_back),
            (f"one per {PACED_GAP_S * 1e3:g} ms, reader idle ({args.sends // 25})", paced),
        ):
            wall = statistics.median(w for w, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            print(f"{name:<28} {how:<34} {wall:6.1f} {cpu:6.1f}")


if __name__ == "__main__":
    main()
