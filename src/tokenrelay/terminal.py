"""Text from models and users made safe for a terminal: no control or bidi characters.

An answer or a question can hold ESC sequences (colours, cursor moves, window titles),
CR or BS that overwrite what was printed, BEL, or bidi overrides (U+202E) that show a
line in another order than it is: printed raw, they rewrite the operator's terminal.
"""

from __future__ import annotations

# C0 controls but TAB and LF, DEL, C1 controls (ESC's 8-bit forms among them).
_CONTROLS = [c for c in range(0x20) if c not in (0x09, 0x0A)] + [0x7F, *range(0x80, 0xA0)]
# Bidi marks, embeddings, overrides and isolates.
_BIDI = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
UNSAFE = frozenset(_CONTROLS + _BIDI)

_DROP = dict.fromkeys(UNSAFE)
_ONE_LINE = {**_DROP, 0x09: " ", 0x0A: " "}
_ESCAPE = {c: f"\\u{c:04x}" for c in UNSAFE if c >= 0x7F}


def safe_text(text: str) -> str:
    """`text` without control and bidi characters; newlines and tabs are kept."""
    return text.translate(_DROP)


def safe_line(text: str) -> str:
    """`text` on one line: control and bidi characters dropped, newlines and tabs as spaces."""
    return text.translate(_ONE_LINE)


def safe_json(line: str) -> str:
    """A JSON text with the characters JSON leaves raw (DEL, C1, bidi) written as \\u escapes:
    the same data for a program, nothing a terminal acts on. C0 is escaped by JSON itself."""
    return line.translate(_ESCAPE)
