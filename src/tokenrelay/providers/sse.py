"""Server-sent events, read lean: bytes in, each event's `data` out, as bytes.

A model streams one `data: {json}` event per token; decoding those to text, splitting
lines and building an object per event cost more CPU than the JSON itself (the `openai`
SDK's reader). This keeps the common shape to one split and one slice per event and
follows the SSE rules for the rest (CR/LF/CRLF line ends, several `data` lines, comments,
a field with no space after its colon). Event names and ids are not needed here.
"""

from __future__ import annotations


class SSEDecoder:
    """Feed it the body as it arrives; it returns the data of each finished event."""

    __slots__ = ("_after_cr", "_rest")

    def __init__(self) -> None:
        self._rest = b""
        self._after_cr = False

    def feed(self, data: bytes) -> list[bytes]:
        if b"\r" in data or self._after_cr:
            data = self._normalise(data)
        if self._rest:
            data = self._rest + data
        elif (
            data.startswith(b"data: ")
            and data.endswith(b"\n\n")
            and data.find(b"\n") == len(data) - 2
        ):
            return [data[6:-2]]  # a read of one whole event, its only line ends it: most reads
        *blocks, self._rest = data.split(b"\n\n")
        out: list[bytes] = []
        for block in blocks:
            if block.startswith(b"data: ") and b"\n" not in block:
                out.append(block[6:])  # the shape every model server sends
            else:
                out.extend(_events(block))
        return out

    def _normalise(self, data: bytes) -> bytes:
        if self._after_cr and data.startswith(b"\n"):
            data = data[1:]  # the LF of a CRLF split across two reads
        self._after_cr = data.endswith(b"\r")
        return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _events(block: bytes) -> list[bytes]:
    """The data of the events in `block`: lines without an empty one at the end."""
    out: list[bytes] = []
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line:  # an extra empty line ends an event early
            if data:
                out.append(b"\n".join(data))
                data = []
            continue
        name, _, value = line.partition(b":")
        if name == b"data":  # anything else is a comment (":...") or a field not needed here
            data.append(value[1:] if value.startswith(b" ") else value)
    if data:
        out.append(b"\n".join(data))
    return out
