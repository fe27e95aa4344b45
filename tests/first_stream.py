"""Run by tests/test_sse.py in a fresh interpreter: a gateway (and an in-process worker) on
the Redis at argv[1], then prints, as JSON, the modules imported while its first answer
streams, over SSE and then over Socket.IO. An import there stalls every stream of the
process, and the first viewer waits for it."""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
from pathlib import Path

import aiohttp
import orjson
import socketio

from tests.conftest import running_gateway
from tokenrelay.settings import Settings


async def main(redis_url: str) -> None:
    settings = Settings(
        redis_url=redis_url,
        key_prefix=f"first{secrets.token_hex(3)}:",
        data_dir=Path(tempfile.mkdtemp()),
        provider="scripted",
        scripted_rate=200.0,
        _env_file=None,
    )
    async with running_gateway(settings, workers=1) as url, aiohttp.ClientSession() as http:
        # The clients' own first-use imports, on a route that answers at once.
        async with http.post(f"{url}/api/none", json={}, headers={"Accept": "text/event-stream"}):
            pass
        imported: dict[str, list[str]] = {}
        before = set(sys.modules)
        body = {"topic": "t", "question": "first", "stream": True}
        async with http.post(
            f"{url}/api/questions", json=body, headers={"Accept": "text/event-stream"}
        ) as resp:
            assert resp.status == 200, resp.status
            async for _ in resp.content.iter_any():
                pass
        imported["sse"] = sorted(set(sys.modules) - before)
        before = set(sys.modules)
        client = socketio.AsyncClient(reconnection=False)
        done = asyncio.Event()

        @client.on("answer")  # type: ignore[untyped-decorator]
        async def on_answer(data: dict[str, object]) -> None:
            if data.get("type") in ("end", "error", "cancelled"):
                done.set()

        await client.connect(url, transports=["websocket"])
        await client.call("ask", {"topic": "t", "question": "first over socket.io", "watch": True})
        async with asyncio.timeout(30):
            await done.wait()
        await client.disconnect()
        imported["socketio"] = sorted(set(sys.modules) - before)
    print(orjson.dumps(imported).decode())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
