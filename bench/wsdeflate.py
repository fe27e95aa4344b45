"""What permessage-deflate costs a token-sized websocket message, server and client.

Browsers and socket.io-client offer permessage-deflate and uvicorn accepts it unless
`ws_per_message_deflate=False`. This serves token-sized Socket.IO chunk packets from
uvicorn (uvloop, httptools, its default websocket implementation, as the gateway runs)
to aiohttp clients that offer deflate as a browser does, paced like answers, and prints
each side's CPU per message and the delivery latency, with the server's deflate on, off,
and with a client that offers none. Run it with `python -m bench.wsdeflate`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import aiohttp
import orjson

from bench.loop import run

Scope = dict[str, Any]


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _app(scope: Scope, receive: Any, send: Any) -> None:
    """GET /cpu: this process's CPU seconds. Websocket: `count rate` in, chunk packets out."""
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(_cpu_s()).encode()})
        return
    if scope["type"] != "websocket":
        return
    await receive()
    await send({"type": "websocket.accept"})
    asked = await receive()
    if asked["type"] != "websocket.receive":
        return  # the client left before asking
    count, rate = asked["text"].split()
    period_s = 1 / float(rate)
    start = time.monotonic() + random.random() * period_s  # answers are not in step
    for i in range(int(count)):
        await asyncio.sleep(max(0.0, start + i * period_s - time.monotonic()))
        text = f'42["chunk",{{"text":" consumer","sent_ns":{time.time_ns()}}}]'
        await send({"type": "websocket.send", "text": text})
    await send({"type": "websocket.send", "text": "done"})
    await receive()


def _serve(port: int, deflate: bool) -> None:
    import uvicorn

    uvicorn.run(
        _app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        loop="uvloop",
        http="httptools",
        ws_per_message_deflate=deflate,
    )


async def _client(port: int, clients: int, count: int, rate: float, offer: bool) -> dict[str, Any]:
    base = f"127.0.0.1:{port}"
    lags_ms: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def server_cpu_s() -> float:
            async with session.get(f"http://{base}/cpu") as r:
                return float(await r.text())

        sockets = [
            await session.ws_connect(f"ws://{base}/ws", compress=15 if offer else 0)
            for _ in range(clients)
        ]
        negotiated = sockets[0].compress

        async def watch(ws: aiohttp.ClientWebSocketResponse) -> int:
            await ws.send_str(f"{count} {rate}")
            got = 0
            async for message in ws:
                if message.data == "done":
                    break
                sent_ns = orjson.loads(message.data[2:])[1]["sent_ns"]
                lags_ms.append((time.time_ns() - sent_ns) / 1e6)
                got += 1
            await ws.send_str("bye")
            return got

        server0, client0 = await server_cpu_s(), _cpu_s()
        got = sum(await asyncio.gather(*(watch(ws) for ws in sockets)))
        server1, client1 = await server_cpu_s(), _cpu_s()
        for ws in sockets:
            await ws.close()
    lags_ms.sort()
    return {
        "deflate_window_bits": negotiated,
        "messages": got,
        "server_us_per_msg": round((server1 - server0) * 1e6 / got, 1),
        "client_us_per_msg": round((client1 - client0) * 1e6 / got, 1),
        "p50_ms": round(statistics.median(lags_ms), 3),
        "p99_ms": round(lags_ms[int(0.99 * (len(lags_ms) - 1))], 3),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _wait_listening(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError(f"the websocket server on port {port} did not start")


CASES = {
    "server deflate on, client offers (browsers today)": (True, True),
    "server deflate off, client offers": (False, True),
    "client offers none": (True, False),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=200, help="websockets at once")
    parser.add_argument("--rate", type=float, default=20.0, help="messages/s per websocket")
    parser.add_argument("--count", type=int, default=100, help="messages per websocket")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--serve", type=str, help=argparse.SUPPRESS)  # the child: port,deflate
    args = parser.parse_args(argv)
    if args.serve:
        port, deflate = args.serve.split(",")
        _serve(int(port), deflate == "1")
        return
    results: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeat):  # interleaved, so a busy moment hits every case
        for label, (deflate, offer) in CASES.items():
            port = _free_port()
            argv_ = [sys.executable, "-m", "bench.wsdeflate", "--serve", f"{port},{int(deflate)}"]
            server = subprocess.Popen(argv_)
            try:
                run(_wait_listening(port))
                row = run(_client(port, args.clients, args.count, args.rate, offer))
            finally:
                server.terminate()
                server.wait()
            results.setdefault(label, []).append(row)
            print(label, row, flush=True)
    print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
