"""Bad input, generated: every HTTP endpoint and Socket.IO event against a real `serve`.

Hypothesis sends wrong types, huge and empty strings, odd Unicode, unknown ids, malformed
cursors and oversized or chunked bodies; schemathesis walks the OpenAPI schema. The rule
is always the same: a clear 4xx or an `error` acknowledgement, never a 500, a crash or a
hang, and the process is healthy and its log clean afterwards.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from tests.support.net import free_port
from tests.support.procs import clean_env

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
TIMEOUT_S = 10.0

# Text that breaks naive code. Lone surrogates too: JSON writes them as "\ud800" escapes,
# which decode to text no UTF-8 store can take.
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
odd_text = st.one_of(
    st.text(max_size=50),
    st.text(st.characters(codec="utf-8"), min_size=0, max_size=300),
    st.text(st.one_of(st.characters(codec="utf-8"), surrogates), min_size=1, max_size=50),
    st.sampled_from(["", " ", "\x00", "\u202e", "\ufeff", "😀" * 500, "a" * 9000, "ß" * 8001]),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | odd_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
    max_leaves=12,
)
ask_keys = st.sampled_from(["topic", "question", "topicQuestion", "stream", "id", "after"])
payloads = st.one_of(json_values, st.dictionaries(ask_keys, json_values, max_size=5))
id_shaped = st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-", min_size=22, max_size=22
)
ids = st.one_of(
    odd_text,
    id_shaped,
    # An id with something around it is no id (a `$` pattern let a trailing newline in).
    st.builds(lambda i, tail: i + tail, id_shaped, st.sampled_from(["\n", "\r\n", " ", "\x00"])),
)
# Digits str.isdigit accepts but Redis does not: superscripts, Arabic-Indic, Devanagari.
odd_digits = st.sampled_from("0123456789\u00b2\u00b3\u00b9\u0660\u0661\u0669\u06f1\u0967")
beyond_64_bits = st.integers(min_value=2**64 - 2, max_value=10**21).map(str)
cursors = st.one_of(
    odd_text,
    st.from_regex(r"\A-?[0-9]{0,25}(-[0-9]{0,25}){0,3}\Z"),
    st.builds(
        lambda a, b: f"{a}-{b}",
        st.text(odd_digits, min_size=1, max_size=21),
        st.text(odd_digits, min_size=1, max_size=21),
    ),
    st.builds(lambda a, b: f"{a}-{b}", beyond_64_bits, st.integers(0, 10).map(str)),
    st.builds(lambda a, b: f"{a}-{b}", st.integers(0, 10).map(str), beyond_64_bits),
)


class Gateway:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log
        self.http = httpx.Client(base_url=url, timeout=TIMEOUT_S)
        self.qid = ""


@pytest.fixture(scope="module")
def gateway(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """`tokenrelay serve` with an in-process scripted worker, shared by this module's tests."""
    workdir = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    env = clean_env(
        REDIS_URL=redis_url,
        TOKENRELAY_KEY_PREFIX=f"z{secrets.token_hex(4)}:",
        TOKENRELAY_PROVIDER="scripted",
        TOKENRELAY_SCRIPTED_RATE="2000",
        TOKENRELAY_SCRIPTED_TEXT="short and sweet",
        TOKENRELAY_DATA_DIR=str(workdir),
    )
    log = workdir / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenrelay", "serve", "--port", str(port)],
            env=env,
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    gw = Gateway(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 60
    while True:
        try:
            if gw.http.get("/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    r = gw.http.post("/api/questions", json={"question": "a real one", "stream": False})
    gw.qid = r.json()["id"]
    yield gw
    gw.http.close()
    proc.terminate()
    proc.wait(timeout=30)


AS_JSON = {"content-type": "application/json"}


def url_text(text: str) -> str:
    """`text` percent-encoded for a URL; a lone surrogate as the bytes UTF-8 would give it."""
    return quote(text, safe="", errors="surrogatepass")


def _clear_4xx(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400 and r.status_code != 405:
        assert r.headers["content-type"].startswith("application/json"), r.headers
        assert isinstance(r.json()["error"], str) and r.json()["error"], r.text[:300]


@FUZZ
@given(body=payloads)
def test_ask_endpoints_take_any_json(gateway: Gateway, body: Any) -> None:
    for path in ("/api/questions", "/askQuestionWithoutStream"):
        # The standard library's json: lone surrogates go out as "\ud800" escapes, as any
        # JSON encoder that escapes non-ASCII would send them.
        r = gateway.http.post(path, content=json.dumps(body), headers=AS_JSON)
        _clear_4xx(r)


@FUZZ
@given(
    raw=st.binary(max_size=2000),
    content_type=st.sampled_from(
        [
            "application/json",
            "text/plain",
            "application/x-www-form-urlencoded",
            "",
            "multipart/form-data",
        ]
    ),
)
def test_ask_endpoints_take_any_bytes(gateway: Gateway, raw: bytes, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/api/questions", "/askQuestionWithoutStream"):
        _clear_4xx(gateway.http.post(path, content=raw, headers=headers))


@FUZZ
@given(qid=ids, after=cursors, limit=odd_text)
def test_id_cursor_and_query_endpoints(gateway: Gateway, qid: str, after: str, limit: str) -> None:
    path = f"/api/questions/{url_text(qid)}"
    for method, url in [
        ("GET", path),
        ("POST", f"{path}/cancel"),
        ("GET", f"{path}/events"),
    ]:
        if not qid or qid in (".", ".."):
            continue  # another route, not this one's input
        _clear_4xx(gateway.http.request(method, url))
    _clear_4xx(gateway.http.get(f"/api/questions?limit={url_text(limit)}"))
    # A real answer, any cursor: its events (it is finished, so they end) or a 422.
    events = f"/api/questions/{gateway.qid}/events"
    _clear_4xx(gateway.http.get(f"{events}?after={url_text(after)}"))
    _clear_4xx(gateway.http.get(f"/api/questions/{gateway.qid}?after={url_text(after)}"))
    header = "".join(ch for ch in after if 32 < ord(ch) < 127)[:200]  # what HTTP can carry
    if header:
        _clear_4xx(gateway.http.get(events, headers={"Last-Event-ID": header}))


def test_a_cursor_past_the_end_is_refused_not_waited_on(gateway: Gateway, sock: SocketIO) -> None:
    """Found by the fuzzing above: such a watch used to wait forever for entries."""
    future = f"{int(time.time() * 1000) + 10**9}-0"
    r = gateway.http.get(f"/api/questions/{gateway.qid}/events", params={"after": future})
    assert r.status_code == 422 and "past this answer's last entry" in r.json()["error"]
    ack = sock.call("watch", {"id": gateway.qid, "after": future})
    assert "past this answer's last entry" in ack["error"]


def test_huge_and_chunked_bodies(gateway: Gateway) -> None:
    megabyte = {"topic": "Redis", "question": "x" * (1024 * 1024)}
    r = gateway.http.post("/api/questions", json=megabyte)
    assert r.status_code == 413 and "bytes" in r.json()["error"]

    def chunks(total: int) -> Iterator[bytes]:
        body = orjson.dumps({"question": "y" * total})
        for i in range(0, len(body), 16 * 1024):
            yield body[i : i + 16 * 1024]

    # No Content-Length: the limit holds while the body streams in.
    as_json = {"content-type": "application/json"}
    r = gateway.http.post("/api/questions", content=chunks(1024 * 1024), headers=as_json)
    assert r.status_code == 413 and "bytes" in r.json()["error"], r.text[:200]
    r = gateway.http.post("/api/questions", content=chunks(100), headers=as_json)
    assert r.status_code == 202, r.text[:200]
    # A Content-Length that lies (httpx will not send one): refused before any reading.
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as raw:
        raw.sendall(
            b"POST /api/questions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 99999999999999999999\r\n\r\n{}"
        )
        status = raw.recv(100).split(b" ")[1]
    assert status in (b"400", b"413"), status


class SocketIO:
    """A bare Socket.IO client over one WebSocket: acks by number, events kept aside."""

    def __init__(self, url: str) -> None:
        ws_url = url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
        self._stack = ExitStack()
        self.ws: ClientConnection = self._stack.enter_context(
            connect(ws_url, max_size=None, open_timeout=TIMEOUT_S)
        )
        assert str(self.ws.recv(timeout=TIMEOUT_S)).startswith("0")
        self.ws.send("40")
        assert str(self.ws.recv(timeout=TIMEOUT_S)).startswith("40")
        self.next_id = 0
        self.errors: list[Any] = []

    def call(self, event: str, data: Any) -> Any:
        self.next_id += 1
        ack = f"43{self.next_id}"
        # The standard library's json: it also writes integers past 64 bits.
        self.ws.send(f"42{self.next_id}" + json.dumps([event, data]))
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            message = str(self.ws.recv(timeout=TIMEOUT_S))
            if message == "2":
                self.ws.send("3")
            elif message.startswith(ack + "["):
                return orjson.loads(message[len(ack) :])[0]
            elif message.startswith('42["error"'):
                self.errors.append(orjson.loads(message[2:])[1])
        raise AssertionError(f"no acknowledgement for {event}")

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="module")
def sock(gateway: Gateway) -> Iterator[SocketIO]:
    client = SocketIO(gateway.url)
    yield client
    client.close()


@FUZZ
@given(
    event=st.sampled_from(["askQuestion", "ask", "watch", "unwatch", "cancel"]),
    data=st.one_of(payloads, st.fixed_dictionaries({"id": ids, "after": cursors})),
)
def test_socketio_events_take_any_payload(sock: SocketIO, event: str, data: Any) -> None:
    ack = sock.call(event, data)
    assert isinstance(ack, dict), ack
    if "error" in ack:
        assert isinstance(ack["error"], str) and ack["error"]
    else:  # it was valid after all
        assert ack.get("ok") is True or "id" in ack, ack


def test_socketio_near_megabyte_payload_is_an_error_not_a_crash(sock: SocketIO) -> None:
    ack = sock.call("ask", {"question": "z" * 900_000})
    assert "limit" in ack["error"]
    assert sock.call("watch", {"id": "C" * 22, "after": "1-" + "9" * 900})["error"]


def test_schemathesis_finds_no_server_error(gateway: Gateway) -> None:
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
    tried = 0
    for result in schema.get_all_operations():
        operation: Any = result.ok()  # type: ignore[union-attr]  # an Err raises: bad schema

        @settings(
            max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            response = case.call(base_url=gateway.url, timeout=TIMEOUT_S)
            assert response.status_code < 500, (case.path, case.body, response.text[:300])

        check()
        tried += 1
    assert tried >= 6


def test_still_healthy_and_log_clean_afterwards(gateway: Gateway) -> None:
    assert gateway.proc.poll() is None
    assert gateway.http.get("/healthz").json()["status"] == "ok"
    log = gateway.log.read_text(errors="replace")
    for bad in ("Traceback", "Exception in ASGI", " 500 ", "ERROR"):
        assert bad not in log, log[log.find(bad) - 2000 : log.find(bad) + 500]
