"""Socket.IO packets whose JSON cannot be read still get an answer.

python-socketio decodes an event's JSON with the standard library: an array nested
100,000 deep raises RecursionError (invalid JSON a ValueError) inside engine.io, which
logs a traceback and drops the packet, so the sender waits for an acknowledgement that
never comes. The packet id is read before the JSON, so the event can still be answered:
it becomes the event UNREADABLE, which the gateway refuses with an `{error}` ack.
"""

from __future__ import annotations

from typing import Any

from socketio import packet

UNREADABLE = "tokenrelay:unreadable"


class TolerantPacket(packet.Packet):  # type: ignore[misc]
    def decode(self, encoded_packet: Any) -> int:
        try:
            return int(super().decode(encoded_packet) or 0)
        except (RecursionError, ValueError) as e:
            if self.packet_type != packet.EVENT:
                raise
            problem = "nests too deep" if isinstance(e, RecursionError) else "is not valid JSON"
            self.data = [UNREADABLE, f"the event's JSON {problem}"]
            return 0
