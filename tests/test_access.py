"""Access: API keys on both protocols, private answers, the rate limit, CORS, and secrets
that never leave the server. Each test drives a real `tokenrelay serve` process."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio

from tests.support.procs import Cluster, Proc, clean_env
from tests.support.sse import events
from tokenrelay.testing import directive

KEY_A = "key-a-" + secrets.token_urlsafe(24)
KEY_B = "key-b-" + secrets.token_urlsafe(24)
OPENAI_SECRET = "sk-access-test-" + secrets.token_hex(16)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@asynccontextmanager
async def serve(tmp_path: Path, redis_url: str, **env: str) -> AsyncIterator[Proc]:
    log_level = env.pop("LOG_LEVEL", "warning")
    settings = {"TOKENRELAY_PROVIDER": "scripted", "TOKENRELAY_SCRIPTED_RATE": "200", **env}
    async with Cluster(tmp_path, redis_url, f"a{secrets.token_hex(4)}:", settings) as cluster:
        yield await cluster.gateway(workers=1, log_level=log_level)


@asynccontextmanager
async def sio(
    url: str, *, token: str | None = None, headers: dict[str, str] | None = None
) -> AsyncIterator[socketio.AsyncClient]:
    client = socketio.AsyncClient(reconnection=False)
    await client.connect(
        url, transports=["websocket"], auth={"token": token} if token else None, headers=headers
    )
    try:
        yield client
    finally:
        await client.disconnect()
        await client.wait()


async def test_api_keys_guard_both_protocols_and_answers_stay_private(
    tmp_path: Path, redis_url: str
) -> None:
    async with (
        serve(tmp_path, redis_url, TOKENRELAY_API_KEYS=f"{KEY_A},{KEY_B}") as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
    ):
        ask = {"question": "mine?"}
        for headers in ({}, auth("not-a-key-" + "x" * 20), {"Authorization": f"Basic {KEY_A}"}):
            r = await http.post("/api/questions", json=ask, headers=headers)
            assert r.status_code == 401, r.text
            assert r.headers["www-authenticate"] == "Bearer" and "API key" in r.json()["error"]
            assert KEY_A not in r.text
        r = await http.post("/askQuestionWithoutStream", json={"topic": "a", "topicQuestion": "b"})
        assert r.status_code == 401
        assert (await http.get("/healthz")).status_code == 200  # probes need no key

        r = await http.post("/api/questions", json=ask, headers=auth(KEY_A))
        assert r.status_code == 202
        qid = r.json()["id"]
        for method, path in [
            ("GET", f"/api/questions/{qid}"),
            ("GET", f"/api/questions/{qid}/events"),
            ("POST", f"/api/questions/{qid}/cancel"),
            ("GET", "/api/questions"),
        ]:
            r = await http.request(method, path)
            assert r.status_code == 401, (method, path)
        # Another key: the answer does not exist for it.
        for method, path in [
            ("GET", f"/api/questions/{qid}"),
            ("GET", f"/api/questions/{qid}/events"),
            ("POST", f"/api/questions/{qid}/cancel"),
        ]:
            r = await http.request(method, path, headers=auth(KEY_B))
            assert r.status_code == 404 and "no question" in r.json()["error"], (method, path)
        listed = (await http.get("/api/questions", headers=auth(KEY_B))).json()["questions"]
        assert listed == []
        seen = [e async for e in events(http, f"/api/questions/{qid}/events", auth(KEY_A))]
        assert seen[-1].event == "end"
        listed = (await http.get("/api/questions", headers=auth(KEY_A))).json()["questions"]
        assert [q["id"] for q in listed] == [qid]

        # Socket.IO: no key, a wrong key: the connection is refused with the reason.
        for token in (None, "wrong-key-" + "y" * 20):
            refused = socketio.AsyncClient(reconnection=False)
            reasons: list[Any] = []
            refused.on("connect_error", reasons.append)
            with pytest.raises(socketio.exceptions.ConnectionError):
                await refused.connect(gw.url, transports=["websocket"], auth={"token": token})
            assert "API key" in reasons[0]["message"], reasons
        async with sio(gw.url, token=KEY_B) as other:
            ack = await other.call("watch", {"id": qid})
            assert "no question" in ack["error"]
            ack = await other.call("cancel", {"id": qid})
            assert "no question" in ack["error"]
        async with sio(gw.url, headers=auth(KEY_A)) as owner:
            ack = await owner.call("watch", {"id": qid})
            assert ack["ok"] is True
            ack = await owner.call("ask", {"question": "over socket", "stream": False})
            assert ack["record"]["status"] == "done"


async def test_rate_limit_per_key_and_per_ip(tmp_path: Path, redis_url: str) -> None:
    env = {"TOKENRELAY_RATE_LIMIT_PER_MIN": "3", "TOKENRELAY_API_KEYS": f"{KEY_A},{KEY_B}"}
    async with (
        serve(tmp_path, redis_url, **env) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
    ):
        answers = [
            (await http.post("/api/questions", json={"question": "q"}, headers=auth(KEY_A)))
            for _ in range(4)
        ]
        assert [r.status_code for r in answers] == [202, 202, 202, 429]
        assert "3 questions a minute" in answers[-1].json()["error"]
        assert 1 <= int(answers[-1].headers["retry-after"]) <= 20
        r = await http.post("/api/questions", json={"question": "q"}, headers=auth(KEY_B))
        assert r.status_code == 202  # another key has its own budget
        async with sio(gw.url, token=KEY_A) as client:
            ack = await client.call("ask", {"question": "one more"})
            assert "rate limit" in ack["error"]
    async with (
        serve(tmp_path / "ip", redis_url, TOKENRELAY_RATE_LIMIT_PER_MIN="2") as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
    ):
        statuses = [
            (await http.post("/api/questions", json={"question": "q"})).status_code
            for _ in range(3)
        ]
        assert statuses == [202, 202, 429]
        async with sio(gw.url) as client:  # the same IP over Socket.IO shares the budget
            ack = await client.call("askQuestion", {"topic": "t", "topicQuestion": "q"})
            assert "rate limit" in ack["error"]


async def _preflight(http: httpx.AsyncClient, origin: str) -> httpx.Response:
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    return await http.options("/api/questions", headers=headers)


async def test_cors_allow_list_is_enforced_never_star(tmp_path: Path, redis_url: str) -> None:
    good, evil = "https://good.example", "https://evil.example"
    async with (
        serve(tmp_path, redis_url, TOKENRELAY_CORS_ORIGINS=good) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
    ):
        r = await _preflight(http, good)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == good
        r = await _preflight(http, evil)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = await http.get("/healthz", headers={"Origin": evil})
        assert "access-control-allow-origin" not in r.headers
        handshake = "/socket.io/?EIO=4&transport=polling"
        r = await http.get(handshake, headers={"Origin": good})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == good
        r = await http.get(handshake, headers={"Origin": evil})
        assert r.status_code == 400
    async with (
        serve(tmp_path / "default", redis_url) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
    ):
        for path in ("/healthz", "/api/questions"):
            r = await http.get(path, headers={"Origin": evil})
            assert "access-control-allow-origin" not in r.headers
        r = await _preflight(http, evil)
        assert r.headers.get("access-control-allow-origin") != "*"
        r = await http.get("/socket.io/?EIO=4&transport=polling", headers={"Origin": evil})
        assert r.status_code == 400  # Socket.IO: same origin only
        r = await http.get("/socket.io/?EIO=4&transport=polling", headers={"Origin": gw.url})
        assert r.status_code == 200


def test_a_bad_api_key_setting_is_refused_without_repeating_it(tmp_path: Path) -> None:
    weak = "tiny-secret"
    result = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "serve"],
        env=clean_env(TOKENRELAY_API_KEYS=f"{KEY_A},{weak}"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "TOKENRELAY_API_KEYS" in result.stderr
    assert weak not in result.stderr + result.stdout and KEY_A not in result.stderr


async def test_secrets_never_returned_nor_logged(tmp_path: Path, redis_url: str) -> None:
    """Set OPENAI_API_KEY and API keys; exercise everything, errors included; grep it all."""
    cluster = Cluster(tmp_path / "mock", redis_url, "unused:")
    mock = await cluster.mock()
    responses: list[str] = []

    def keep(r: httpx.Response) -> httpx.Response:
        responses.append(f"{r.status_code} {r.headers} {r.text}")
        return r

    env = {
        "TOKENRELAY_PROVIDER": "openai",
        "OPENAI_BASE_URL": mock.url,
        "OPENAI_MODEL": "mock-llm",
        "OPENAI_API_KEY": OPENAI_SECRET,
        "TOKENRELAY_API_KEYS": f"{KEY_A},{KEY_B}",
        "TOKENRELAY_PROVIDER_MAX_RETRIES": "0",
        "LOG_LEVEL": "debug",
    }
    try:
        async with (
            serve(tmp_path, redis_url, **env) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
        ):
            for question in ("fine", directive(fail=401), directive(fail=500), "x" * 9000):
                body = {"question": question, "stream": False}
                keep(await http.post("/api/questions", json=body, headers=auth(KEY_A)))
            qid = await http.post("/api/questions", json={"question": "q"}, headers=auth(KEY_A))
            qid_ = keep(qid).json()["id"]
            calls: list[tuple[str, str, dict[str, str]]] = [
                ("GET", "/healthz", {}),
                ("GET", "/openapi.json", {}),
                ("GET", "/docs", {}),
                ("GET", "/api/questions", auth(KEY_A)),
                ("GET", f"/api/questions/{qid_}", auth(KEY_A)),
                ("GET", f"/api/questions/{qid_}/events", auth(KEY_A)),
                ("GET", f"/api/questions/{qid_}", auth(KEY_B)),
                ("POST", f"/api/questions/{qid_}/cancel", auth("wrong-" + OPENAI_SECRET)),
                ("GET", "/api/questions/nope", auth(KEY_A)),
                ("GET", "/nowhere", {}),
            ]
            for method, path, headers in calls:
                keep(await http.request(method, path, headers=headers))
            r = await http.post(
                "/askQuestionWithoutStream",
                json={"topic": "t", "topicQuestion": directive(fail=401)},
                headers=auth(KEY_B),
            )
            keep(r)
            assert r.status_code == 502 and "refused access" in r.json()["error"]
            received: list[Any] = []
            async with sio(gw.url, token=KEY_A) as client:
                client.on("*", lambda event, data: received.append((event, data)))
                received.append(await client.call("ask", {"question": directive(fail=401)}))
                received.append(await client.call("ask", {"question": 5}))
                received.append(await client.call("watch", {"id": "B" * 22}))
            logs = gw.text()
    finally:
        await cluster.__aexit__(None, None, None)
    everything = "\n".join([*responses, repr(received), logs])
    assert "refused access" in everything  # the 401 path really ran
    for secret in (OPENAI_SECRET, KEY_A, KEY_B):
        assert secret not in everything
