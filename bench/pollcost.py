"""What engine.io's writer pays per packet to wait for it: the socket's `poll()`.

A Socket.IO viewer's every chunk is a packet put on its engine.io socket's queue, and the
socket's writer task waits for it in `poll()`. Measured here, in this process's own CPU
(`time.process_time`) per packet, with one packet put per turn of the event loop (the
writer waits for each, as at 20 tokens/s): engine.io's own `AsyncSocket.poll`
(`asyncio.wait_for`: a task and a timer per wait), the gateway's `LeanSocket.poll`
(gateway/engine.py), and a bare `queue.get()` for the floor. Then a whole delivery to an
idle websocket writer, as the gateway's `_emit_all` makes it: engine.io's `send` (queued;
the real writer task wakes, polls and writes) against `LeanSocket.send_now` (written from
the sender's task), on a websocket that takes every write at once. The ways take turns,
`--rounds` times over. Run it alone with `python -m bench.pollcost` (`--help`).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import engineio
from engineio.async_socket import AsyncSocket
from engineio.packet import MESSAGE, Packet

from bench.loop import run
from bench.stats import medians_table
from tokenrelay.gateway.engine import LeanSocket


async def _per_packet(poll: Any, queue: asyncio.Queue[Any], packets: int) -> float:
    """CPU µs per packet: a packet put, then the writer's poll takes it, `packets` times."""
    packet = Packet(MESSAGE, data="a chunk")

    async def writer() -> None:
        taken = 0
        while taken < packets:  # a poll returns every packet queued by then
            taken += len(await poll())

    started = time.process_time()
    task = asyncio.create_task(writer())
    for _ in range(packets):
        await asyncio.sleep(0)  # the writer is waiting again
        queue.put_nowait(packet)
        await asyncio.sleep(0)
    await task
    return (time.process_time() - started) * 1e6 / packets


class _TakingWebSocket:
    """engine.io's websocket wrapper over a client that takes every write at once."""

    def __init__(self) -> None:
        self.sent = 0
        self.closed = asyncio.Event()

    async def send(self, text: str) -> None:
        self.sent += 1

    async def wait(self) -> None:
        await self.closed.wait()

    async def close(self) -> None:
        self.closed.set()


async def _per_delivery(server: Any, direct: bool, packets: int) -> float:
    """CPU µs per packet delivered to an idle websocket writer, one per turn of the loop."""
    socket = LeanSocket(server, "sid")
    server.sockets["sid"] = socket
    ws = _TakingWebSocket()
    handler = asyncio.create_task(socket._websocket_handler(ws))
    for _ in range(10):  # the handler starts its writer, which waits for packets
        await asyncio.sleep(0)
    if socket._waiting is None:
        raise RuntimeError("the socket's writer did not start")
    text = '2["chunk",{"text":"a chunk"}]'
    started = time.process_time()
    for _ in range(packets):
        if not (direct and await socket.send_now(["4" + text])):
            await server.send("sid", text)
        await asyncio.sleep(0)  # the writer, woken or not, is waiting again
    spent = time.process_time() - started
    await ws.close()
    await handler
    del server.sockets["sid"]
    if ws.sent < packets:
        raise RuntimeError(f"{packets - ws.sent} of {packets} packets were not written")
    return spent * 1e6 / packets


async def _measure(packets: int, rounds: int) -> dict[str, list[float]]:
    server = engineio.AsyncServer(async_mode="asgi")
    results: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, cls in (("engine.io AsyncSocket", AsyncSocket), ("LeanSocket", LeanSocket)):
            socket = cls(server, "sid")
            results.setdefault(name, []).append(
                await _per_packet(socket.poll, socket.queue, packets)
            )
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def get(queue: asyncio.Queue[Any] = queue) -> list[Any]:
            return [await queue.get()]

        results.setdefault("bare queue.get", []).append(await _per_packet(get, queue, packets))
        deliveries = (("delivery, queued for the writer", False), ("delivery, send_now", True))
        for name, direct in deliveries:
            results.setdefault(name, []).append(await _per_delivery(server, direct, packets))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pollcost", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--packets", type=int, default=20_000, help="packets per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each way once a round")
    args = parser.parse_args()
    results = run(_measure(args.packets, args.rounds))
    title = f"CPU per packet, median of {args.rounds} rounds of {args.packets:,}:"
    print(medians_table(title, results))


if __name__ == "__main__":
    main()
