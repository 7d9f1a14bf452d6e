"""The counter example (the seed's counter task) under the real supervisor:
interrupted at step 5 with exit 75, it resumes and ends as an uninterrupted run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

try:  # the tests directory is on sys.path (rootdir-relative imports)
    from integration._util import run_ckpt
except ImportError:  # pragma: no cover - run from the repository root as a package
    from tests.integration._util import run_ckpt

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "counter" / "train.py"


def _run(tmp_path: Path, name: str, fail_at: int) -> tuple[str, dict[str, int]]:
    work = tmp_path / name
    work.mkdir()
    res = run_ckpt(
        [
            "run",
            "--dir",
            str(work / "ck"),
            "--remote",
            str(work / "remote"),
            "--backoff",
            "0",
            "--",
            sys.executable,
            str(EXAMPLE),
        ],
        cwd=work,
        env={"COUNTER_DELAY": "0", "COUNTER_FAIL_AT": str(fail_at)},
    )
    assert res.returncode == 0, res.stderr
    state = json.loads((work / "ck" / "state.json").read_text())
    return res.stdout, state


def test_counter_resumes_after_exit_75_to_the_same_total(tmp_path: Path) -> None:
    plain_out, plain_state = _run(tmp_path, "plain", fail_at=99)
    out, state = _run(tmp_path, "interrupted", fail_at=5)
    assert state == plain_state == {"step": 10, "total": 55}
    assert out.splitlines()[-1] == plain_out.splitlines()[-1] == "done: 10 steps, total 55"
    assert "attempt 2: starting at step 5" in out
    done = [line for line in out.splitlines() if line.startswith("step ") and "total" in line]
    assert [int(line.split()[1].rstrip(":")) for line in done] == list(range(1, 11))
