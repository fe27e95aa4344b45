"""The `tokenrelay` command as a user runs it: settings errors, embedded Valkey, persistence."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.net import free_port
from tokenrelay.providers.select import local_available
from tokenrelay.testing import answer_text


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenrelay", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"TOKENRELAY_PORT": "eighty"}, "TOKENRELAY_PORT"),
        ({"TOKENRELAY_PORT": "70000"}, "TOKENRELAY_PORT"),
        ({"TOKENRELAY_CORS_ORIGINS": "*"}, "TOKENRELAY_CORS_ORIGINS"),
        ({"TOKENRELAY_RETENTION_S": "-5"}, "TOKENRELAY_RETENTION_S"),
        ({"TOKENRELAY_PROVIDER": "gpt"}, "TOKENRELAY_PROVIDER"),
        ({"TOKENRELAY_KEY_PREFIX": "a{b}:"}, "TOKENRELAY_KEY_PREFIX"),
        ({"OPENAI_MODEL": ""}, "OPENAI_MODEL"),
    ],
)
def test_bad_setting_stops_startup_with_one_line(env: dict[str, str], name: str) -> None:
    result = run_cli("serve", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tokenrelay: invalid setting ") and name in lines[0]


def test_no_model_configured_says_what_to_set(tmp_path: Path) -> None:
    if local_available():
        pytest.skip("the local model is installed here, so `auto` picks it")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TOKENRELAY_"))}
    result = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "OPENAI_API_KEY" in result.stderr and "tokenrelay[local]" in result.stderr


def test_help_explains_commands() -> None:
    out = run_cli("--help").stdout
    assert "serve" in out and "worker" in out and "REDIS_URL" in out
    serve = run_cli("serve", "--help").stdout
    assert "--host" in serve and "--port" in serve and "--workers" in serve


@contextmanager
def serve(
    data_dir: Path, port: int, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    settings_env = env or {"TOKENRELAY_PROVIDER": "scripted", "TOKENRELAY_SCRIPTED_RATE": "500"}
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(TOKENRELAY_DATA_DIR=str(data_dir), **settings_env)
    log = data_dir / f"serve-{port}.log"
    with log.open("a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenrelay", "serve", "--port", str(port)],
            env=env,
            text=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            proc.kill()
            proc.wait()
            raise AssertionError(f"serve did not come up:\n{log.read_text()}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)


def _valkeys_on(data_dir: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name", "cwd"]):
        try:
            if "valkey" in (p.info["name"] or "") and str(data_dir) in (p.cwd() or ""):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_embedded_valkey_persists_answers_across_restarts(tmp_path: Path) -> None:
    port = free_port()
    with serve(tmp_path, port):
        assert len(_valkeys_on(tmp_path)) == 1
        r = httpx.post(
            f"http://127.0.0.1:{port}/api/questions",
            json={"question": "keep me", "stream": False},
            timeout=30,
        )
        qid = r.json()["id"]
        answer = r.json()["output"]
    assert _valkeys_on(tmp_path) == []  # stopped with serve
    assert list((tmp_path / "valkey").glob("appendonly*")), "no AOF written"
    with serve(tmp_path, port):
        body = httpx.get(f"http://127.0.0.1:{port}/api/questions/{qid}").json()
        history = httpx.get(f"http://127.0.0.1:{port}/api/questions").json()["questions"]
    assert body["question"]["status"] == "done"
    assert body["answer"] == answer
    assert [q["id"] for q in history] == [qid]


def test_serve_answers_through_an_openai_compatible_server(tmp_path: Path) -> None:
    """`OPENAI_BASE_URL` alone is enough: serve picks the openai provider and streams."""
    mock_port, port = free_port(), free_port()
    mock = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay.testing.mockllm", "--port", str(mock_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        env = {"OPENAI_BASE_URL": f"http://127.0.0.1:{mock_port}/v1", "OPENAI_MODEL": "mock-llm"}
        with serve(tmp_path, port, env):
            r = httpx.post(
                f"http://127.0.0.1:{port}/askQuestionWithoutStream",
                json={"topic": "Redis", "topicQuestion": "What is a stream?"},
                timeout=30,
            )
            record = httpx.get(f"http://127.0.0.1:{port}/api/questions").json()["questions"][0]
    finally:
        mock.terminate()
        mock.wait(timeout=10)
    assert r.status_code == 200
    assert r.json()["output"] == answer_text("What is a stream?")
    assert record["provider"] == "openai" and record["model"] == "mock-llm"
