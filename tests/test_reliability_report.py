"""scripts/reliability_report.py: docs/reliability.md from the fault suite's rows, keeping
the notes written by hand under its "Measured ..." line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "scripts" / "reliability_report.py"
ROW = {
    "scenario": "Gateway SIGKILLed mid-answer",
    "load": "50 viewers",
    "faults": "SIGKILL",
    "lost": 0,
    "doubled": 0,
    "result": "pass: all finished",
    "order": 100,
}


def _run(results: Path, out: Path) -> str:
    subprocess.run([sys.executable, str(SCRIPT), str(results), str(out)], check=True)
    return out.read_text()


def test_regenerating_keeps_the_hand_written_notes(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "100.json").write_text(json.dumps(ROW))
    out = tmp_path / "reliability.md"
    first = _run(results, out)
    assert "| Gateway SIGKILLed mid-answer | 50 viewers |" in first
    measured = next(line for line in first.splitlines() if line.startswith("Measured at"))
    assert " cores" in measured and "Python" in measured
    model = next(
        (
            line.partition(":")[2].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "",
    )
    assert model in measured  # the machine named: sessions land on different CPUs
    notes = "A note by hand.\nAnd a second line, with | a bar."
    out.write_text(first.replace(measured + "\n", f"{measured}\n{notes}\n", 1))
    again = _run(results, out)
    assert f"\n{notes}\n" in again
    assert again.count("| scenario | load |") == 1 and again.count(notes) == 1
    assert again.index(notes) < again.index("| Gateway SIGKILLed")
    # A file without notes stays without.
    out.write_text(first)
    assert _run(results, out).count("A note by hand") == 0
