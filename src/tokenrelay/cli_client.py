"""`tokenrelay ask`, `watch` and `history`: the Client in a terminal.

Exit codes: 0 the answer ended well; 1 it failed (model error) or was cancelled elsewhere;
2 bad input (the gateway's 4xx message is shown); 3 the gateway is unreachable or failed
(5xx); 130 interrupted with Ctrl-C (which cancels an answer this command asked for).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from datetime import datetime
from types import TracebackType

import orjson
from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

from tokenrelay.client import (
    Answer,
    AnswerEvent,
    AnswerFailed,
    AnswerStream,
    Client,
    ClientError,
    RequestRejected,
    ServerUnreachable,
)
from tokenrelay.settings import Settings
from tokenrelay.terminal import safe_json, safe_line, safe_text

COMMANDS = ("ask", "watch", "history")
INTERRUPTED = 130


class Printer:
    """Shows an answer: JSON lines, live Markdown in a terminal, or plain text in a pipe."""

    def __init__(self, console: Console, *, json: bool) -> None:
        self.console = console
        self.json = json
        self.text = ""
        self.last: AnswerEvent | None = None
        self._live: Live | None = None

    def __enter__(self) -> Printer:
        if not self.json and self.console.is_terminal:
            self._live = Live(console=self.console, refresh_per_second=12)
            self._live.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.update(Markdown(self.text))
            self._live.stop()  # renders the whole answer, even past the screen's height
        elif not self.json and self.text and not self.text.endswith("\n"):
            self._write("\n")

    def event(self, event: AnswerEvent) -> None:
        self.last = event
        if self.json:
            self._write(safe_json(orjson.dumps(dict(event.data)).decode()) + "\n")
        elif event.type == "chunk":
            text = safe_text(event.text)
            self.text += text
            if self._live is not None:
                self._live.update(Markdown(self.text))
            else:
                self._write(text)
        elif event.type == "restart":
            self.text = ""
            if self._live is None:
                self._write("\n[a worker restarted this answer; it starts over]\n")

    def whole(self, answer: Answer) -> None:
        if self.json:
            line = orjson.dumps({**answer.end.data, "id": answer.id, "text": answer.text})
            self._write(safe_json(line.decode()) + "\n")
        elif self.console.is_terminal:
            self.console.print(Markdown(safe_text(answer.text)))
        else:
            self._write(safe_text(answer.text) + "\n")

    def _write(self, text: str | bytes) -> None:
        out = self.console.file
        out.write(text.decode() if isinstance(text, bytes) else text)
        out.flush()


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--server", help="the gateway's URL (TOKENRELAY_SERVER, default http://127.0.0.1:8000)"
        )
        parser.add_argument("--json", action="store_true", help="one JSON object per line")

    ask = sub.add_parser(
        "ask",
        help="ask a question and stream the answer into the terminal",
        description="Ask, then print the answer as it arrives (Markdown in a terminal, plain "
        "text in a pipe). --follow ID asks a follow-up in the thread of an earlier answer. "
        "Ctrl-C cancels the answer. Exit 0 done, 1 the model failed, "
        "2 rejected, 3 gateway unreachable, 130 interrupted.",
    )
    ask.add_argument("question")
    ask.add_argument("--topic", help="what the model is an expert on (default: Redis)")
    ask.add_argument("--no-stream", action="store_true", help="print the whole answer at the end")
    ask.add_argument(
        "--follow",
        metavar="ID",
        help="ask a follow-up to the question ID, whose answer is done: the model sees that "
        "thread's earlier questions and answers (`tokenrelay history` lists the ids)",
    )
    common(ask)

    watch = sub.add_parser(
        "watch",
        help="follow an answer by id (resumable with --after)",
        description="Print an answer from the start, or after an entry ID. Ctrl-C detaches "
        "and prints the command that resumes.",
    )
    watch.add_argument("id")
    watch.add_argument("--after", help="the last entry ID already seen")
    common(watch)

    history = sub.add_parser("history", help="list recent questions, newest first")
    history.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    common(history)


def run(args: argparse.Namespace, settings: Settings) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per HTTP request
    try:
        key = settings.api_key.get_secret_value() if settings.api_key else None
        return asyncio.run(_run(args, args.server or settings.server, key))
    except ServerUnreachable as e:
        _error(f"tokenrelay: {e}; is `tokenrelay serve` running? (--server, TOKENRELAY_SERVER)")
        return 3
    except RequestRejected as e:
        _error(f"tokenrelay: the gateway refused ({e.status}): {e}")
        return 3 if e.status >= 500 else 2
    except AnswerFailed as e:
        _error(f"tokenrelay: the answer {e.question_id} failed ({e.kind}): {e}")
        return 1
    except ClientError as e:
        _error(f"tokenrelay: {e}")
        return 1


async def _run(args: argparse.Namespace, server: str, api_key: str | None) -> int:
    async with Client(server, api_key=api_key) as client:
        if args.command == "history":
            return await _history(client, args.limit, json=args.json)
        printer = Printer(Console(highlight=False), json=args.json)
        if args.command == "watch":
            return await _follow(client.watch(args.id, after=args.after), printer, asked=False)
        if args.no_stream:
            answer = await client.ask(
                args.question, topic=args.topic, stream=False, follows=args.follow
            )
            printer.whole(answer)
            return 0
        stream = await client.ask(args.question, topic=args.topic, follows=args.follow)
        return await _follow(stream, printer, asked=True, client=client)


async def _follow(
    stream: AnswerStream, printer: Printer, *, asked: bool, client: Client | None = None
) -> int:
    """Print until the answer ends; Ctrl-C cancels it (if we asked) or detaches."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGINT, task.cancel)
    try:
        with printer:
            async for event in stream:
                printer.event(event)
    except asyncio.CancelledError:
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C stops at once
        task.uncancel()
        if asked and client is not None:
            await client.cancel(stream.id)
            _error(f"tokenrelay: cancelled {stream.id}")
        else:
            after = f" --after {stream.last_entry_id}" if stream.last_entry_id else ""
            _error(f"tokenrelay: stopped watching; resume: tokenrelay watch {stream.id}{after}")
        return INTERRUPTED
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    last = printer.last
    if last is not None and last.type in ("error", "cancelled"):
        kind = "cancelled" if last.type == "cancelled" else str(last.data.get("kind", "error"))
        raise AnswerFailed(stream.id, kind, last.text or "the answer was cancelled")
    return 0


def _error(message: str) -> None:
    # Not through rich: one unwrapped line, and no "[...]" read as markup. Error texts can
    # quote the model or its server: no control characters reach the terminal.
    print(safe_line(message), file=sys.stderr, flush=True)


async def _history(client: Client, limit: int, *, json: bool) -> int:
    out = sys.stdout
    for q in await client.history(limit):
        if json:
            out.write(safe_json(orjson.dumps(q).decode()) + "\n")
            continue
        when = datetime.fromtimestamp(q.created_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")
        line = f"{q.id}  {q.status:<9}  {when}  [{q.topic}] {q.question}"
        if q.follows:
            line += f"  (follows {q.follows})"
        out.write(safe_line(line) + "\n")
    out.flush()
    return 0
