"""A real Chromium attacks a real `serve` (issue 12): cross-site request forgery from a page
on a second loopback origin, and DNS rebinding (a page on evil.example whose name now
resolves to 127.0.0.1). The gateway's access log shows each forged request arrived and
was refused; nothing was asked."""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Route, async_playwright

from tests.faults_report import record
from tests.support.net import free_port
from tests.support.procs import Cluster, Proc
from tests.web_browser import CHROMIUM, CHROMIUM_ARGS, build_bundle, require_browser

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

FORGERY_PAGE = """<!doctype html><html><body>
<iframe name="sink"></iframe>
<script>
const target = "%(target)s";
const chat = JSON.stringify({model: "x", messages: [{role: "user", content: "forged fetch"}]});
window.forged = (async () => {
  const sent = [];
  const attempts = [
    // text/plain and no Content-Type at all: "simple" requests, sent without a preflight.
    ["/v1/chat/completions", {"Content-Type": "text/plain"}, chat],
    ["/v1/chat/completions", {}, new Blob([chat])],
    ["/api/questions", {"Content-Type": "text/plain"}, JSON.stringify({question: "forged"})],
    ["/api/questions", {}, new Blob([JSON.stringify({question: "forged blob"})])],
    ["/askQuestionWithoutStream", {"Content-Type": "text/plain"},
     JSON.stringify({topic: "t", topicQuestion: "forged"})],
  ];
  for (const [path, headers, body] of attempts) {
    try {
      await fetch(target + path, {method: "POST", mode: "no-cors", headers, body});
      sent.push(path);
    } catch (e) { sent.push(path + " failed: " + e); }
  }
  // The classic: a form posting text/plain whose body happens to be JSON.
  const form = document.createElement("form");
  form.method = "POST";
  form.enctype = "text/plain";
  form.action = target + "/v1/chat/completions";
  form.target = "sink";
  const input = document.createElement("input");
  input.name = '{"messages": [{"role": "user", "content": "forged form", "x": "';
  input.value = '"}]}';
  form.appendChild(input);
  document.body.appendChild(form);
  form.submit();
  return sent;
})();
</script></body></html>"""

REBOUND_PAGE = """<!doctype html><html><body><script>
window.probe = (async () => {
  const out = {};
  const status = async (path, init) => {
    try { return (await fetch(path, init)).status; } catch (e) { return "network error"; }
  };
  out.history = await status("/api/questions");
  out.ask = await status("/api/questions", {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({question: "rebound"}),
  });
  out.polling = await status("/socket.io/?EIO=4&transport=polling");
  out.websocket = await new Promise((resolve) => {
    const ws = new WebSocket(
      location.origin.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket");
    ws.onmessage = (m) => { resolve("open: " + String(m.data).slice(0, 1)); ws.close(); };
    ws.onerror = () => resolve("refused");
    setTimeout(() => resolve("timeout"), 10000);
  });
  return out;
})();
</script></body></html>"""


@contextmanager
def attacker_site(html: str) -> Iterator[str]:
    """A real HTTP server on another loopback origin serving one page."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@asynccontextmanager
async def chromium(*extra_args: str) -> AsyncIterator[Browser]:
    require_browser()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *extra_args], headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> AsyncIterator[Proc]:
    settings = {"TOKENRELAY_PROVIDER": "scripted", "TOKENRELAY_SCRIPTED_RATE": "2000"}
    workdir = tmp_path_factory.mktemp("websec")
    async with Cluster(workdir, redis_url, f"w{secrets.token_hex(4)}:", settings) as cluster:
        yield await cluster.gateway(workers=1, log_level="info")


async def asked(gw: Proc) -> int:
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        return len((await http.get("/api/questions", params={"limit": 1000})).json()["questions"])


async def access_log(gw: Proc, pattern: str, count: int) -> list[str]:
    """Wait until the gateway's access log has `count` lines matching `pattern`."""
    for _ in range(100):
        lines = [line for line in gw.text().splitlines() if re.search(pattern, line)]
        if len(lines) >= count:
            return lines
        await asyncio.sleep(0.1)
    return lines


async def test_a_page_on_another_origin_cannot_start_answers(gateway: Proc) -> None:
    before = await asked(gateway)
    async with chromium() as browser:
        with attacker_site(FORGERY_PAGE % {"target": gateway.url}) as evil_url:
            page = await browser.new_page()
            await page.goto(evil_url)
            sent = await page.evaluate("window.forged")
            assert all(" failed" not in s for s in sent), sent  # the browser did send them
            refused = await access_log(gateway, r'"POST /(v1|api|askQuestion).* 415', 6)
            await page.close()
    # Each forged POST reached the gateway (five fetches and the form) and got 415.
    assert len(refused) == 6, gateway.text()[-3000:]
    assert await asked(gateway) == before
    record(
        "Security: cross-site forgery from Chromium",
        order=1203,
        load="a page on a second loopback origin: 5 no-cors fetches (text/plain, no "
        "Content-Type) and a text/plain form to the three ask routes",
        faults="cross-site request forgery",
        lost=None,
        doubled=None,
        result="pass: all 6 requests reached the gateway and were answered 415; "
        "0 questions asked (was: the front door started answers)",
    )


async def test_dns_rebinding_page_is_refused(gateway: Proc) -> None:
    before = await asked(gateway)
    evil = f"http://evil.example:{gateway.port}"
    # evil.example now resolves to 127.0.0.1: the attacker's page, loaded before the switch,
    # talks to the gateway as its own origin.
    # Chromium's own guard (Local Network Access: a page that did not come from this machine
    # may not reach loopback) is off here: the gateway must refuse on its own, for older
    # browsers and any other client.
    no_lna = "--disable-features=LocalNetworkAccessChecks,BlockInsecurePrivateNetworkRequests"
    async with chromium("--host-resolver-rules=MAP evil.example 127.0.0.1", no_lna) as browser:
        page = await browser.new_page()

        async def attacker_document(route: Route) -> None:
            await route.fulfill(status=200, content_type="text/html", body=REBOUND_PAGE)

        await page.route(f"{evil}/attack", attacker_document)
        await page.goto(f"{evil}/attack")
        rebound = await page.evaluate("window.probe")
        # The control: the same script on the gateway's own origin works.
        await page.route(f"{gateway.url}/attack", attacker_document)
        await page.goto(f"{gateway.url}/attack")
        control = await page.evaluate("window.probe")
        await page.close()
    assert rebound == {"history": 400, "ask": 400, "polling": 400, "websocket": "refused"}, rebound
    assert control["history"] == 200 and control["ask"] == 202, control
    assert control["polling"] == 200 and control["websocket"] == "open: 0", control
    assert await asked(gateway) == before + 1  # the control's ask only
    hits = await access_log(gateway, r"evil\.example|400 Bad Request", 1)
    assert hits
    record(
        "Security: DNS rebinding from Chromium",
        order=1202,
        load="a page on evil.example:PORT, the name resolved to 127.0.0.1 "
        "(--host-resolver-rules; Chromium's own Local Network Access check off, so the gateway "
        "alone decides): history, ask, Engine.IO polling and WebSocket",
        faults="DNS rebinding (Host: evil.example)",
        lost=None,
        doubled=None,
        result=f"pass: {rebound}; the same page on 127.0.0.1: history {control['history']}, "
        f"ask {control['ask']}, polling {control['polling']}, WebSocket open "
        "(was: handshake, asks, streams and every caller's history)",
    )


async def test_the_page_shows_a_stored_answer_longer_than_one_read(
    tmp_path: Path, redis_url: str
) -> None:
    """GET /api/questions/{id} returns 1 MiB of text at a time: the page reads on."""
    build_bundle()
    text = " ".join(f"p{n:04d}" + "z" * 3994 for n in range(600))  # 2.4 MB in 600 chunks
    (tmp_path / ".env").write_text(f"TOKENRELAY_SCRIPTED_TEXT={text}\n")
    settings = {"TOKENRELAY_PROVIDER": "scripted", "TOKENRELAY_SCRIPTED_RATE": "5000"}
    async with Cluster(tmp_path, redis_url, f"b{secrets.token_hex(4)}:", settings) as cluster:
        gw = await cluster.gateway(workers=1)
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
            r = await http.post("/api/questions", json={"question": "long?", "stream": False})
            qid = r.json()["id"]
            assert (await http.get(f"/api/questions/{qid}")).json()["next_after"]
        async with chromium() as browser:
            page = await browser.new_page()
            await page.goto(f"{gw.url}/?q={qid}")
            await page.wait_for_selector('#answer[data-status="done"]', timeout=60_000)
            shown = await page.inner_text("#answer-body")
            await page.close()
    assert re.findall(r"p(\d{4})", shown) == [f"{n:04d}" for n in range(600)]
