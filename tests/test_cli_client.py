"""`tokenrelay ask/watch/history` as a user runs them: real processes against a real gateway."""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import running_gateway
from tests.faults_report import record
from tests.support.net import free_port
from tokenrelay import Client
from tokenrelay.settings import Settings, env_name
from tokenrelay.testing import MockLLM, directive

TEXT = " ".join(f"word{i}" for i in range(30))
PIPE = asyncio.subprocess.PIPE


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    return {**env, "NO_COLOR": "1", **extra}


async def start(
    *args: str, env: dict[str, str] | None = None, **kw: Any
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenrelay", *args, env=env or environment(), **kw
    )


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await start(*args, env=env, stdout=PIPE, stderr=PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:  # timed out or cancelled: never leave it running
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def json_lines(proc: asyncio.subprocess.Process) -> AsyncIterator[dict[str, Any]]:
    assert proc.stdout is not None
    while line := await asyncio.wait_for(proc.stdout.readline(), 30):
        yield orjson.loads(line)


@pytest.fixture
async def gateway_url(make_settings: Callable[..., Settings]) -> AsyncIterator[str]:
    async with running_gateway(make_settings(scripted_text=TEXT, scripted_rate=20.0)) as url:
        yield url


async def test_ask_prints_the_answer_as_it_arrives(gateway_url: str) -> None:
    proc = await start("ask", "Why streams?", "--server", gateway_url, stdout=PIPE, stderr=PIPE)
    assert proc.stdout is not None
    reads: list[bytes] = []
    while data := await asyncio.wait_for(proc.stdout.read(4096), 30):
        reads.append(data)
    assert await proc.wait() == 0
    assert b"".join(reads).decode() == TEXT + "\n"
    assert len(reads) > 5  # at 20 chunks/s the text came in pieces, not at the end


async def test_json_lines_topic_and_no_stream(gateway_url: str) -> None:
    code, out, _ = await run("ask", "Q?", "--topic", "Valkey", "--json", "--server", gateway_url)
    events = [orjson.loads(line) for line in out.splitlines()]
    assert code == 0 and events[0]["type"] == "start" and events[-1]["type"] == "end"
    assert events[0]["topic"] == "Valkey" and {e["id"] for e in events} == {events[0]["id"]}
    assert "".join(e["text"] for e in events if e["type"] == "chunk") == TEXT
    code, out, _ = await run("ask", "Whole?", "--no-stream", "--server", gateway_url)
    assert code == 0 and out == TEXT + "\n"
    code, out, _ = await run("ask", "Whole?", "--no-stream", "--json", "--server", gateway_url)
    whole = orjson.loads(out)
    assert code == 0 and whole["text"] == TEXT and whole["type"] == "end" and whole["chunks"] == 30


async def test_ctrl_c_cancels_the_answer(gateway_url: str) -> None:
    proc = await start(
        "ask", "Long one", "--json", "--server", gateway_url, stdout=PIPE, stderr=PIPE
    )
    async for event in json_lines(proc):
        if event["type"] == "chunk":
            proc.send_signal(signal.SIGINT)
            break
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    qid = event["id"]
    assert proc.returncode == 130 and f"cancelled {qid}" in err.decode()
    async with Client(gateway_url) as client:
        events = [e async for e in client.watch(qid)]
    assert events[-1].type == "cancelled"


async def test_watch_resumes_after_a_cursor_and_detaches_on_ctrl_c(gateway_url: str) -> None:
    async with Client(gateway_url) as client:
        stream = await client.ask("Watch me")
        first = [e async for e in stream]
    cursor = first[5].entry_id
    code, out, problem = await run(
        "watch", stream.id, "--after", cursor, "--json", "--server", gateway_url
    )
    assert code == 0, problem
    assert [e["entry_id"] for e in map(orjson.loads, out.splitlines())] == [
        e.entry_id for e in first[6:]
    ]

    async with Client(gateway_url) as client:
        slow = await client.ask("Watch me live")
    proc = await start(
        "watch", slow.id, "--json", "--server", gateway_url, stdout=PIPE, stderr=PIPE
    )
    seen = []
    async for event in json_lines(proc):
        seen.append(event)
        if len(seen) == 3:
            proc.send_signal(signal.SIGINT)
            break
    rest, err = await asyncio.wait_for(proc.communicate(), 30)
    seen.extend(orjson.loads(line) for line in rest.splitlines())  # printed before the signal
    assert proc.returncode == 130, err.decode()
    assert seen[-1]["type"] == "chunk"
    assert f"tokenrelay watch {slow.id} --after {seen[-1]['entry_id']}" in err.decode()
    async with Client(gateway_url) as client:
        assert (await client.watch(slow.id).collect()).text == TEXT  # detaching did not cancel


async def test_history_lists_questions(gateway_url: str) -> None:
    async with Client(gateway_url) as client:
        older = await client.ask("Older?", stream=False)
        newer = await client.ask("Newer?", topic="Valkey", stream=False)
    code, out, _ = await run("history", "--limit", "2", "--server", gateway_url)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith(newer.id) and "done" in lines[0] and "[Valkey] Newer?" in lines[0]
    assert lines[1].startswith(older.id)
    env = environment(TOKENRELAY_SERVER=gateway_url)
    code, out, _ = await run("history", "--json", env=env)
    records = [orjson.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["id"] for r in records[:2]] == [newer.id, older.id]
    assert records[0]["status"] == "done" and records[0]["chunks"] == 30


async def test_failures_exit_non_zero_with_one_line(make_settings: Callable[..., Settings]) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    code, _, err = await run("ask", "Hello?", "--server", nobody)
    assert code == 3 and err.count("\n") == 1 and f"cannot reach tokenrelay at {nobody}" in err
    code, _, err = await run("ask", "Hello?", env=environment(TOKENRELAY_SERVER="ftp://x"))
    assert code == 2 and env_name("server") in err
    async with MockLLM() as mock:
        settings = make_settings(
            provider="openai", openai_base_url=mock.base_url, provider_max_retries=0
        )
        async with running_gateway(settings) as url:
            code, _, err = await run("ask", " ", "--server", url)
            assert code == 2 and "(422): 'question' must not be empty" in err
            code, _, err = await run("watch", "A" * 22, "--server", url)
            assert code == 2 and "(404): no question with id" in err
            code, out, err = await run("ask", f"Key? {directive(fail=401)}", "--server", url)
            assert code == 1 and err.count("\n") == 1
            assert "failed (auth)" in err and "OPENAI_API_KEY" in err
            code, out, err = await run("ask", "Fine?", "--no-stream", "--server", url)
            assert code == 0 and out.startswith("Answer about Fine:")


async def test_terminal_gets_rendered_markdown(make_settings: Callable[..., Settings]) -> None:
    markdown = "# Streams\n\nAn **append-only** log:\n\n- XADD\n- XREAD\n"
    async with running_gateway(make_settings(scripted_text=markdown)) as url:
        main, child = pty.openpty()
        env = environment(TERM="xterm-256color", COLUMNS="80", LINES="40")
        env.pop("NO_COLOR")
        proc = await start("ask", "Markdown?", "--server", url, env=env, stdout=child, stderr=child)
        os.close(child)
        screen = await asyncio.to_thread(read_all, main)
        assert await proc.wait() == 0
    text = screen.decode(errors="replace")
    assert "append-only" in text and "**" not in text  # bold was rendered, not printed
    assert "\x1b[1;4mStreams" in text and " • \x1b[0mXADD" in text  # a styled heading, bullets


def read_all(fd: int) -> bytes:
    chunks = []
    try:
        while data := os.read(fd, 65536):
            chunks.append(data)
    except OSError:  # EIO: the child closed the terminal
        pass
    finally:
        os.close(fd)
    return b"".join(chunks)


def test_help_lists_the_client_commands() -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert all(name in out for name in ("ask", "watch", "history"))


def test_configuration_doc_names_every_setting() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    missing = [env_name(f) for f in Settings.model_fields if f"`{env_name(f)}`" not in doc]
    assert not missing, f"docs/configuration.md does not describe {missing}"


async def test_server_flag_beats_the_environment(gateway_url: str) -> None:
    env = environment(TOKENRELAY_SERVER=f"http://127.0.0.1:{free_port()}")
    code, out, _ = await run("ask", "Which?", "--no-stream", "--server", gateway_url, env=env)
    assert code == 0 and out == TEXT + "\n"
    async with httpx.AsyncClient(base_url=gateway_url) as http:
        assert (await http.get("/api/questions")).json()["questions"][0]["question"] == "Which?"


async def test_api_key_from_the_environment(make_settings: Callable[..., Settings]) -> None:
    key = "cli-key-0123456789abcdef"
    async with running_gateway(make_settings(scripted_text=TEXT, api_keys=key)) as url:
        code, _, err = await run("ask", "Hi?", "--server", url)
        assert code == 2 and "(401)" in err and key not in err
        env = environment(TOKENRELAY_API_KEY=key, TOKENRELAY_SERVER=url)
        code, out, _ = await run("ask", "Hi?", "--no-stream", env=env)
        assert code == 0 and out == TEXT + "\n"


HOSTILE = (
    "title\x1b]0;pwned\x07 clear\x1b[2J back\rover bell\x07 \u202eevil\u2066 c1\x9b31m\nnext line"
)


@pytest.mark.faults  # `make reliability` writes its row
async def test_output_strips_control_and_bidi_characters(
    make_settings: Callable[..., Settings],
) -> None:
    """A question or answer with ESC sequences, CR, BEL or U+202E cannot rewrite the terminal."""
    from tokenrelay.terminal import UNSAFE

    def clean(text: str) -> bool:
        return not any(ord(ch) in UNSAFE for ch in text)

    async with running_gateway(make_settings(scripted_text=HOSTILE)) as url:
        code, out, _ = await run("ask", f"Who? {HOSTILE}", "--topic", HOSTILE, "--server", url)
        assert code == 0 and clean(out), repr(out)
        assert "title]0;pwned clear[2J backover bell evil c131m\nnext line" in out
        code, out, _ = await run("ask", "Whole?", "--no-stream", "--server", url)
        assert code == 0 and clean(out) and "\nnext line" in out, repr(out)
        code, out, _ = await run("history", "--server", url)
        assert code == 0 and clean(out) and len(out.splitlines()) == 2, repr(out)
        assert "[title]0;pwned clear[2J backover bell evil c131m next line] Who? title" in out
        for command in (("history", "--json"), ("ask", "Json?", "--json")):
            code, out, _ = await run(*command, "--server", url)
            assert code == 0 and clean(out), repr(out)
            # The data is intact for a program: JSON escapes carry every character.
            texts = [orjson.loads(line).get("text", "") for line in out.splitlines()]
            questions = [orjson.loads(line).get("topic", "") for line in out.splitlines()]
            assert HOSTILE in "".join(texts) or HOSTILE in questions
        async with Client(url) as client:
            qid = (await client.history(1))[0].id
        main, child = pty.openpty()
        env = environment(TERM="xterm-256color", COLUMNS="80", LINES="40")
        env.pop("NO_COLOR")
        proc = await start("watch", qid, "--server", url, env=env, stdout=child, stderr=child)
        os.close(child)
        screen = (await asyncio.to_thread(read_all, main)).decode(errors="replace")
        assert await proc.wait() == 0
    # rich styles with CSI sequences of its own; none of the answer's reach the screen.
    for bad in ("\x1b]0;", "\x07", "\x1b[2J", "\u202e", "\u2066", "\x9b"):
        assert bad not in screen, (bad, screen)
    assert "pwned" in screen and "evil" in screen
    record(
        "Security: terminal output of the CLI",
        order=1208,
        load="a question, topic and answer holding OSC and CSI sequences, CR, BEL, C1 and "
        "U+202E/U+2066; `ask` (pipe, --no-stream, --json), `history` (--json), `watch` on a pty",
        faults="terminal escape injection",
        lost=None,
        doubled=None,
        result="pass: none of those characters reach the terminal; answers keep their "
        "newlines; --json escapes them (\\u202e) so the data is intact",
    )


async def test_ask_follow_asks_in_a_thread(make_settings: Callable[..., Settings]) -> None:
    async with MockLLM() as mock:
        settings = make_settings(
            provider="openai", openai_base_url=mock.base_url, openai_model="mock-llm"
        )
        async with running_gateway(settings) as url:
            first = f"Streams? {directive(tokens=6)}"
            code, out, _ = await run("ask", first, "--no-stream", "--json", "--server", url)
            assert code == 0, out
            earlier = orjson.loads(out)
            follow = f"And groups? {directive(tokens=6)}"
            code, out, err = await run(
                "ask", "--follow", earlier["id"], follow, "--json", "--server", url
            )
            assert code == 0, err
            events = [orjson.loads(line) for line in out.splitlines()]
            code, listed, _ = await run("history", "--limit", "2", "--server", url)
            bad, _, refused = await run("ask", "--follow", "Z" * 22, "Who?", "--server", url)
            helped, usage, _ = await run("ask", "--help")
        async with httpx.AsyncClient(timeout=10) as http:
            bodies = (await http.get(f"{mock.base_url}/mock/requests")).json()
    (body,) = [b for b in bodies if "And groups?" in b["messages"][-1]["content"]]
    assert [(m["role"], m["content"]) for m in body["messages"][1:]] == [
        ("user", first),
        ("assistant", earlier["text"]),
        ("user", follow),
    ]
    assert events[-1]["type"] == "end"
    newest = listed.splitlines()[0]
    assert newest.startswith(events[0]["id"]) and newest.endswith(f"(follows {earlier['id']})")
    assert bad == 2 and "(404)" in refused
    assert helped == 0 and "--follow ID" in usage
