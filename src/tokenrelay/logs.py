"""Log set-up, and the one line each answer leaves on the worker that ended it.

Plain lines read well in a terminal; with TOKENRELAY_LOG_JSON=true every line is one JSON
object, and the per-answer line carries its figures as fields, for log pipelines.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime

import orjson

from tokenrelay.wire import STATUS_OF_TERMINAL, Entry

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
answers = logging.getLogger("tokenrelay.answers")


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", ...figures}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        figures = getattr(record, "figures", None)
        if isinstance(figures, Mapping):
            out.update(figures)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure(level: str, *, json: bool) -> None:
    """One handler on the root logger, to stderr; uvicorn's loggers propagate to it."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def answer_ended(question_id: str, entry: Entry, figures: Mapping[str, object]) -> None:
    """`question <id> done: duration_ms=… ttft_ms=… chunks=… prompt_tokens=… …`."""
    status = STATUS_OF_TERMINAL[entry.type].value
    shown = {k: v for k, v in figures.items() if k != "error"}
    if "kind" in entry.meta:
        shown["kind"] = entry.meta["kind"]
    answers.info(
        "question %s %s: %s",
        question_id,
        status,
        " ".join(f"{k}={v}" for k, v in shown.items()),
        extra={"figures": {"question_id": question_id, "status": status, **shown}},
    )
