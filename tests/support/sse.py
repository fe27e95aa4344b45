"""The one Server-Sent Events parser of the tests: bytes in, events out.

`events()` reads a gateway's stream over httpx, as a program would; the light viewers of
the fault scenarios feed it the bytes they read off a raw socket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from json import loads
from typing import Any

import httpx


@dataclass(frozen=True)
class Event:
    id: str
    event: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RawEvent:
    id: str
    event: str
    data: str


@dataclass
class Parser:
    """Feed bytes as they arrive; get each complete event once (comments are skipped)."""

    _buffer: bytes = b""
    _fields: dict[str, str] = field(default_factory=dict)

    def feed(self, data: bytes) -> list[RawEvent]:
        self._buffer += data
        out: list[RawEvent] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = self._buffer[:end].rstrip(b"\r").decode()
            self._buffer = self._buffer[end + 1 :]
            if line == "":
                if "data" in self._fields:
                    f = self._fields
                    out.append(RawEvent(f.get("id", ""), f.get("event", "message"), f["data"]))
                self._fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data" and "data" in self._fields:
                    value = f"{self._fields['data']}\n{value}"
                self._fields[name] = value
        return out


async def events(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str] | None = None,
    *,
    method: str = "GET",
    json: Any = None,
) -> AsyncIterator[Event]:
    """`url` (GET, or `method` with a `json` body) as an event stream; each event's data
    parsed as JSON."""
    async with client.stream(method, url, headers=headers, json=json) as response:
        response.raise_for_status()
        parser = Parser()
        async for data in response.aiter_bytes():
            for raw in parser.feed(data):
                yield Event(raw.id, raw.event, loads(raw.data))
