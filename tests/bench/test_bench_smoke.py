"""The benchmark suite still runs: bench/run.py --quick on the cases that need
only ckpt, Python, cp and rsync (no object-store server), into a temp dir.
Nothing about speed is asserted (figures on a shared CI machine say nothing);
what is checked is that every case ran, printed a PASS or MISS line per
target, and wrote its report and chart. The full suite is `bench/run`
(README, "Speed")."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Small files, incremental, start-up, page-cache pressure, the duty cycle (judged
#: on paired ratios), the appender's lag and the cost of the format checks.
CASES = ("3", "4", "9", "11", "12", "13", "14")


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
@pytest.mark.timeout(600)
def test_quick_run_writes_a_report_and_a_chart(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "results"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--cases",
            ",".join(CASES),
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=540,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    verdicts = re.findall(r"^\s+(PASS|MISS)\s+case (\d+):", res.stdout, re.M)
    assert {case for _v, case in verdicts} == set(CASES), res.stdout
    report = (out / "report.md").read_text()
    for heading in ("## Machine", "## Method", *(f"## {n}." for n in CASES)):
        assert heading in report
    # Every timed table gives the minimum and the median, every target its statistic.
    assert "| min s | median s |" in report
    assert "ratio of minimums" in report and "median of per-round paired ratios" in report
    assert "ERROR" not in report, report
    assert report.count("**PASS**") + report.count("**MISS**") >= 2 * len(verdicts)
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any((tmp_path / "work").iterdir()), "the work dir is left behind"
