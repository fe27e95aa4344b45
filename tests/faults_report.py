"""Each fault scenario records one row of docs/reliability.md as a JSON file.

Rows go to $TOKENRELAY_RELIABILITY_DIR when it is set (`make reliability` sets it);
`scripts/reliability_report.py` turns the directory into the table.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

ENV = "TOKENRELAY_RELIABILITY_DIR"


def record(
    scenario: str,
    *,
    load: str,
    faults: str,
    lost: int | None,
    doubled: int | None,
    result: str,
    order: int = 0,
    figures: dict[str, Any] | None = None,
) -> None:
    """Write one row; `order` sorts rows in the table (the issue's scenario number)."""
    out = os.environ.get(ENV)
    if not out:
        return
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    row = {
        "scenario": scenario,
        "order": order,
        "load": load,
        "faults": faults,
        "lost": lost,
        "doubled": doubled,
        "result": result,
        "figures": figures or {},
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    slug = re.sub(r"[^a-z0-9]+", "-", scenario.lower()).strip("-")
    (directory / f"{order:03d}-{slug}.json").write_text(json.dumps(row, indent=2) + "\n")
