"""The SSE ask's two requests past FastAPI's machinery (gateway/quick_routes.py): it takes
exactly the asks the route would take as they are, answers them and their event streams as
the routes do, and hands every other request to the routes untouched."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest
from pydantic import ValidationError
from starlette.types import Message, Receive, Scope, Send

from tests.conftest import running_gateway
from tokenrelay.gateway.access import Access
from tokenrelay.gateway.http import AskBody
from tokenrelay.gateway.quick_routes import ASK_PATH, QuickRoutes, plain_ask
from tokenrelay.services import open_services
from tokenrelay.settings import Settings

PAYLOADS: list[object] = [
    {"question": "q"},
    {"question": "q", "topic": "t", "stream": False, "follows": None},
    {"question": "q", "follows": "abc"},
    {"question": "", "topic": ""},  # AskBody takes it; ask_input refuses it, for both paths
    {},
    {"topic": "t"},
    {"question": 1},
    {"question": None},
    {"question": "q", "topic": None},
    {"question": "q", "stream": 1},
    {"question": "q", "stream": "true"},
    {"question": "q", "follows": 5},
    {"question": "q", "extra": 1},
    {"question": "q", "topicQuestion": "q"},
    {"question": ["q"]},
    [],
    "q",
    None,
    1,
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_plain_ask_takes_what_askbody_takes_and_nothing_else(payload: object) -> None:
    try:
        expected: dict[str, Any] | None = AskBody.model_validate(payload).model_dump()
    except ValidationError:
        expected = None
    assert plain_ask(payload) == expected


def _scope(app: object, body_type: bytes = b"application/json") -> Scope:
    return {
        "type": "http",
        "method": "POST",
        "path": ASK_PATH,
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", body_type)],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "app": app,
    }


def _one_body(body: bytes) -> Receive:
    messages: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return receive


async def test_plain_asks_skip_the_route_and_others_reach_it_untouched(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    async with open_services(settings, gateway=True, workers=0) as services:
        app = SimpleNamespace(state=SimpleNamespace(services=services, access=Access(settings)))
        routed: list[bytes] = []

        async def route(scope: Scope, receive: Receive, send: Send) -> None:
            routed.append((await receive())["body"])

        quick = QuickRoutes(route)
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        body = orjson.dumps({"topic": "t", "question": "plain?"})
        await quick(_scope(app), _one_body(body), send)
        assert routed == [] and sent[0]["status"] == 202
        qid = orjson.loads(sent[1]["body"])["id"]
        assert (await services.store.record(qid)).question == "plain?"

        for other, kind in (
            (orjson.dumps({"question": "q", "extra": 1}), b"application/json"),
            (b'{"question": "q"', b"application/json"),
            (body, b"text/plain"),
        ):
            await quick(_scope(app, kind), _one_body(other), send)
            assert routed[-1] == other
        assert len(routed) == 3

        sent.clear()
        events = {**_scope(app), "method": "GET", "path": f"/api/questions/{'x' * 22}/events"}
        await quick(events, _one_body(b""), send)
        assert len(routed) == 3 and sent[0]["status"] == 404
        assert orjson.loads(sent[1]["body"]) == {
            "error": f"no question with id {'x' * 22!r} (never asked, or expired)"
        }
        await quick({**events, "method": "HEAD"}, _one_body(b""), send)
        await quick({**events, "path": events["path"] + "/"}, _one_body(b""), send)
        assert len(routed) == 5


async def _reply(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, str, Any]:
    r = await client.post("/api/questions", json=body)
    return r.status_code, r.headers.get("www-authenticate", ""), r.json()


async def test_errors_are_the_routes(make_settings: Callable[..., Settings]) -> None:
    """The same refusals as the route gives them: a missing key (401, before the body is
    looked at), an input ask_input refuses (422), a thread that does not exist (404)."""
    async with (
        running_gateway(make_settings(api_keys=["k-1234567890abcdef"])) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        quick = await _reply(client, {"question": "q"})
        routed = await _reply(client, {"question": "q", "extra": 1})
        assert quick == routed and quick[0] == 401 and quick[1] == "Bearer"
        client.headers["Authorization"] = "Bearer k-1234567890abcdef"
        status, _, body = await _reply(client, {"question": "  "})
        assert (status, body) == (422, {"error": "'question' must not be empty"})
        status, _, body = await _reply(client, {"question": "q", "follows": "x" * 22})
        assert status == 404 and "no question with id" in body["error"]
        status, _, body = await _reply(client, {"question": "q"})
        assert status == 202 and body["status"] == "queued"
