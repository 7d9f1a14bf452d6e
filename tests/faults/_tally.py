"""The fault-injection suite's tally: what was injected, by kind, so a run can
say how many faults it survived (printed at the end of the pytest run, and
written as JSON to $CKPT_FAULT_REPORT when that is set).

A test calls `record(kind, n)` only after its assertions passed, so the tally
counts faults survived, not faults attempted. xdist workers write one JSON line
per record to their own file in the directory the controller made
(CKPT_FAULT_TALLY_DIR); tests/conftest.py adds them up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TALLY_ENV = "CKPT_FAULT_TALLY_DIR"


def record(kind: str, n: int = 1, **detail: object) -> None:
    """Count n injected (and survived) faults of one kind, e.g.
    record("supervisor kill -9", 1, phase="upload")."""
    where = os.environ.get(TALLY_ENV)
    if not where:
        return  # a test run outside pytest's session (no controller): nothing to add to
    line = json.dumps({"kind": kind, "n": n, **detail}, sort_keys=True, default=str)
    with open(Path(where) / f"{os.getpid()}.jsonl", "a", encoding="utf-8") as f:
        f.write(line + "\n")


def totals(where: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in sorted(where.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            counts[rec["kind"]] = counts.get(rec["kind"], 0) + int(rec["n"])
    return counts
