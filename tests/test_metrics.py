"""/metrics and the per-answer log line, read from real gateways and worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import socketio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import running_gateway
from tests.support.net import free_port
from tokenrelay import Client
from tokenrelay.settings import Settings
from tokenrelay.testing import MockLLM, directive

WORDS = " ".join(f"w{n}" for n in range(30))


def sample(text: str, metric: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def scrape(url: str) -> str:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return response.text


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENRELAY_", "OPENAI_"))}
    env.update(
        REDIS_URL=str(settings.redis_url),
        TOKENRELAY_KEY_PREFIX=settings.key_prefix,
        TOKENRELAY_DATA_DIR=str(settings.data_dir),
        TOKENRELAY_PROVIDER="scripted",
        TOKENRELAY_SCRIPTED_TEXT=settings.scripted_text,
        TOKENRELAY_SCRIPTED_RATE=str(settings.scripted_rate),
        TOKENRELAY_RECLAIM_IDLE_MS=str(settings.reclaim_idle_ms),
        **extra,
    )
    return env


@contextlib.asynccontextmanager
async def process(
    *args: str, env: dict[str, str], module: str = "tokenrelay"
) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def wait_for_metrics(url: str, metric: str, at_least: float, **labels: str) -> str:
    for _ in range(600):
        with contextlib.suppress(httpx.TransportError):
            text = await scrape(url)
            if sample(text, metric, **labels) >= at_least:
                return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"{metric}{labels} never reached {at_least}")


async def test_gateway_counts_answers_errors_and_chunks(
    make_settings: Callable[..., Settings],
) -> None:
    async with MockLLM() as mock:
        settings = make_settings(
            provider="openai", openai_base_url=mock.base_url, provider_max_retries=0
        )
        async with running_gateway(settings) as url, Client(url) as client:
            alone = await scrape(url)
            sio = socketio.AsyncClient(reconnection=False)
            await sio.connect(url, transports=["websocket"])
            connected = await scrape(url)
            await sio.disconnect()
            before = await scrape(url)
            good = await client.ask(f"Count? {directive(tokens=12, rate=200)}", stream=False)
            bad = await client.ask(f"Key? {directive(fail=401)}")
            assert [e.type async for e in bad][-1] == "error"
            after = await scrape(url)
            async with httpx.AsyncClient() as http:
                stored = (await http.get(f"{url}/api/questions/{good.id}")).json()["entries"]

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert good.end.data["chunks"] == 12
    sockets = [sample(t, "tokenrelay_socketio_connections") for t in (alone, connected, before)]
    assert sockets[1] == sockets[0] + 1 and sockets[2] == sockets[0]
    assert delta("tokenrelay_questions_total", status="done") == 1
    assert delta("tokenrelay_questions_total", status="failed") == 1
    assert delta("tokenrelay_model_errors_total", kind="auth") == 1
    assert delta("tokenrelay_time_to_first_token_seconds_count") == 1  # the failed one had none
    assert delta("tokenrelay_inter_token_gap_seconds_count") == 11
    # An entry per chunk entry of the stream: 12, or fewer when the worker's writes fell
    # behind and it merged pieces into one entry (each piece still counts in `chunks`).
    entries = [e for e in stored if e["type"] == "chunk"]
    assert 1 <= len(entries) <= 12 and "".join(e["text"] for e in entries) == good.text
    assert delta("tokenrelay_entries_relayed_total", type="chunk") == len(entries)
    assert delta("tokenrelay_entries_relayed_total", type="end") == 1
    assert sample(after, "tokenrelay_worker_slots") >= 64
    assert sample(after, "process_resident_memory_bytes") > 0


async def test_viewers_slots_and_lag_while_a_viewer_does_not_read(
    make_settings: Callable[..., Settings],
) -> None:
    # 16 KB chunks and a viewer that never reads: once its socket's buffers are full (a few
    # MB on loopback) the gateway cannot send, and what it reads for that viewer piles up.
    text = " ".join("x" * 16_000 + str(n) for n in range(300))
    settings = make_settings(scripted_text=text, scripted_rate=100.0)
    async with running_gateway(settings) as url, Client(url) as client:
        stream = await client.ask("Flood me")
        port = int(url.rsplit(":", 1)[1])
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        stuck.connect(("127.0.0.1", port))
        # A Host the gateway answers to (any other is refused before the request is read).
        request = f"GET /api/questions/{stream.id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        stuck.sendall(request.encode())
        try:
            during = await wait_for_metrics(url, "tokenrelay_viewer_lag_max_entries", 20)
            assert sample(during, "tokenrelay_viewers_connected") >= 1
            assert sample(during, "tokenrelay_worker_slots_in_use") >= 1
            assert sample(during, "tokenrelay_viewer_lag_entries") >= 20
        finally:
            stuck.close()
        await stream.collect()
        after = await wait_for_metrics(url, "tokenrelay_worker_slots_in_use", 0)
        for _ in range(100):  # the closed viewer's task notices at its next write
            after = await scrape(url)
            if sample(after, "tokenrelay_viewers_connected") == 0:
                break
            await asyncio.sleep(0.05)
    assert sample(after, "tokenrelay_viewers_connected") == 0
    assert sample(after, "tokenrelay_viewer_lag_max_entries") == 0


async def test_worker_process_metrics_pending_and_reclaimed(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(scripted_text=WORDS, scripted_rate=20.0, reclaim_idle_ms=1000)
    first_port, second_port = free_port(), free_port()
    async with running_gateway(settings, workers=0) as url, Client(url) as client:
        stream = await client.ask("Who takes me?")
        waiting = await scrape(url)
        assert sample(waiting, "tokenrelay_requests_waiting") == 1
        env = env_for(settings, TOKENRELAY_METRICS_PORT=str(first_port))
        async with process("worker", env=env) as first:
            events = stream.__aiter__()
            while (await anext(events)).type != "chunk":
                pass
            pending = await scrape(url)
            metrics = await scrape(f"http://127.0.0.1:{first_port}")
            first.kill()  # SIGKILL: its request stays pending until another worker reclaims it
            await first.wait()
        assert sample(pending, "tokenrelay_requests_pending") == 1
        assert sample(pending, "tokenrelay_requests_waiting") == 0
        assert sample(metrics, "tokenrelay_worker_slots_in_use") == 1
        assert sample(metrics, "tokenrelay_worker_slots") == 64
        env = env_for(settings, TOKENRELAY_METRICS_PORT=str(second_port))
        async with process("worker", env=env):
            async for _ in events:
                pass
            second = f"http://127.0.0.1:{second_port}"
            done = await wait_for_metrics(second, "tokenrelay_questions_total", 1, status="done")
            idle = await scrape(url)
    assert sample(done, "tokenrelay_requests_reclaimed_total") == 1
    assert sample(done, "tokenrelay_time_to_first_token_seconds_count") == 1
    assert sample(idle, "tokenrelay_requests_pending") == 0


async def read_lines(proc: asyncio.subprocess.Process, until: Callable[[str], bool]) -> list[str]:
    assert proc.stderr is not None
    lines: list[str] = []
    while line := (await asyncio.wait_for(proc.stderr.readline(), 30)).decode():
        lines.append(line.rstrip("\n"))
        if until(lines[-1]):
            break
    return lines


async def serve_and_ask(settings: Settings, **env: str) -> tuple[str, list[str]]:
    port = free_port()
    environ = env_for(settings, TOKENRELAY_PORT=str(port), **env)
    async with process("serve", env=environ) as serve:
        url = f"http://127.0.0.1:{port}"
        # Under serve the workers are processes of their own: the gateway shows them as
        # supervised children, not as its slots.
        await wait_for_metrics(url, "tokenrelay_process_up", 1, name="worker-0", kind="worker")
        async with Client(url) as client:
            answer = await client.ask("Log me", stream=False)
        lines = await read_lines(serve, lambda line: answer.id in line)
        serve.send_signal(signal.SIGTERM)
        assert serve.stderr is not None
        rest = await asyncio.wait_for(serve.stderr.read(), 30)
        lines += rest.decode().splitlines()
    return answer.id, lines


async def test_json_logs_one_object_per_line_with_the_answer_figures(
    make_settings: Callable[..., Settings],
) -> None:
    qid, lines = await serve_and_ask(make_settings(scripted_text=WORDS), TOKENRELAY_LOG_JSON="true")
    records: list[dict[str, Any]] = [orjson.loads(line) for line in lines]  # every line is JSON
    (answer,) = [r for r in records if r.get("question_id") == qid]
    assert answer["logger"] == "tokenrelay.answers" and answer["status"] == "done"
    assert answer["chunks"] == 30 and answer["completion_tokens"] == 30
    assert answer["ttft_ms"] >= 0 and answer["duration_ms"] > 0
    assert answer["message"].startswith(f"question {qid} done: ")
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's lines too


async def test_plain_log_line_per_answer(make_settings: Callable[..., Settings]) -> None:
    qid, lines = await serve_and_ask(make_settings(scripted_text=WORDS))
    (line,) = [line for line in lines if qid in line]
    assert f"tokenrelay.answers: question {qid} done: " in line
    assert "chunks=30" in line and "ttft_ms=" in line and "completion_tokens=30" in line


async def test_uvicorn_worker_processes_as_deployment_documents(
    make_settings: Callable[..., Settings],
) -> None:
    """docs/deployment.md: `uvicorn --factory ... --workers 2` gateways, a separate worker."""
    settings = make_settings(scripted_text=WORDS, scripted_rate=200.0)
    port = free_port()
    env = env_for(settings, TOKENRELAY_WORKERS="0")
    factory = "tokenrelay.gateway.app:from_environment"
    uvicorn = ("--factory", factory, "--workers", "2", "--port", str(port))
    async with (
        process(*uvicorn, env=env, module="uvicorn"),
        process("worker", env=env),
    ):
        url = f"http://127.0.0.1:{port}"
        await wait_for_metrics(url, "tokenrelay_worker_slots", 0)
        answers = []
        for n in range(4):  # a new connection each: either process may take it
            async with Client(url) as client:
                answers.append(await client.ask(f"Which process? {n}", stream=False))
        gateway = await scrape(url)
    assert [a.text for a in answers] == [WORDS] * 4
    assert sample(gateway, "tokenrelay_worker_slots") == 0  # answered by the worker process


def test_gap_histogram_reads_as_prometheus_clients_histogram() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from tokenrelay.metrics import _Gaps

    bounds = (0.005, 0.05, 1, 10)
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    histogram = Histogram("gap_seconds", "Gaps.", buckets=bounds, registry=theirs)
    gaps = _Gaps("gap_seconds", "Gaps.", bounds)
    ours.register(gaps)
    for amount_s in (0.001, 0.005, 0.0051, 0.05, 0.3, 1, 10, 10.5, 99):  # bounds included
        histogram.observe(amount_s)
        gaps.observe(amount_s)

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return [line for line in text.splitlines() if "_created" not in line]

    assert lines(ours) == lines(theirs)
    assert sample(generate_latest(ours).decode(), "gap_seconds_created") > 0
