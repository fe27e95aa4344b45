"""Workers: the consumer-group loop (`loop`), one answer's life (`answer`), batched
appends (`writer`)."""

from __future__ import annotations

from tokenrelay.worker.answer import Answer, Generator
from tokenrelay.worker.loop import Worker
from tokenrelay.worker.writer import ChunkWriter

__all__ = ["Answer", "ChunkWriter", "Generator", "Worker"]
