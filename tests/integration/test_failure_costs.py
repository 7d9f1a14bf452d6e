"""What failures cost (issue 20), through the real binary: a run whose child
checkpoints at moments it logs and fails a logged time later, twice, then is
preempted (the fake metadata service); a second `ckpt run`, as on the
replacement machine. The run history must show the work each failure lost
and the time each relaunch took, within a tolerance of what the child's own
clock measured; `ckpt ls --runs` (text and JSON), the `end` event of
--log-json and `ckpt timeline` (terminal, HTML, SVG) must show them.

No wall-clock threshold on ckpt's speed: every expectation is the child's
measurement, compared with a tolerance that a loaded machine stays inside
(the two clocks are the same machine's; what differs is when each side saw
an event, a scheduler's delay)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from ckpt import ExitCode
from metadata import MetadataServer

from ._util import Running, ckpt_ok, run_args, run_ckpt, script, wait_for

pytestmark = pytest.mark.timeout(240)

#: Seconds the child's clock and ckpt's may disagree on one event here (the
#: child logs just before it exits; ckpt notes the exit when it reaps it).
TOLERANCE = 1.5

#: Logs to argv[1] (one JSON object per line, outside --dir) when it starts,
#: saves (tmp + rename) and exits. Attempts 1 and 2: start, save after 0.5 s,
#: fail with 75 three seconds after the save. Attempt 3: save, then wait for
#: the stop (no checkpoint handler: a preemption stops it with SIGTERM, and
#: it saves nothing more). A later attempt saves and exits 0.
CHILD = """
    import json, os, signal, sys, time
    from pathlib import Path

    d = Path(os.environ["CKPT_DIR"])
    log = Path(sys.argv[1])
    n = int(os.environ["CKPT_ATTEMPT"])

    def note(event):
        with open(log, "a") as f:
            f.write(json.dumps({"attempt": n, "event": event, "t": time.time(),
                                "restored": os.environ.get("CKPT_RESTORED", "")}) + "\\n")

    def on_term(signum, frame):
        note("exit")
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_term)
    note("start")
    time.sleep(0.5)
    (d / "state.tmp").write_text(f"state of attempt {n}")
    os.replace(d / "state.tmp", d / "state.txt")
    note("save")
    if n <= 2:
        time.sleep(3.0)
        note("exit")
        sys.exit(75)
    if n == 3:
        while True:
            time.sleep(0.05)
    note("exit")
"""


def _log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _at(log: list[dict[str, Any]], attempt: int, event: str) -> float:
    (t,) = [e["t"] for e in log if e["attempt"] == attempt and e["event"] == event]
    return float(t)


def _runs(remote: Path) -> list[dict[str, Any]]:
    found = [json.loads(p.read_text()) for p in (remote / "runs").glob("*.json")]
    return sorted(found, key=lambda r: r["started"])


def _durable(remote: Path, text: str) -> bool:
    """A snapshot holds state.txt with this text (its size tells)."""
    snaps = remote / "snapshots"
    for p in snaps.glob("*.json") if snaps.is_dir() else []:
        for e in json.loads(p.read_text())["entries"]:
            if e["path"] == "state.txt" and e.get("size") == len(text):
                return True
    return False


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_lost_work_and_time_to_resume_of_two_failures_and_a_preemption(
    spawn: Callable[..., Running],
    tmp_path: Path,
    ckpt_dir: Path,
    remote: Path,
    metadata: MetadataServer,
) -> None:
    log = tmp_path / "child.log"
    events = tmp_path / "events.jsonl"
    cmd = [*script(tmp_path, "child.py", CHILD), str(log)]
    env = {"CKPT_METADATA_URL": metadata.url, "CKPT_PREEMPTION": "aws"}
    ckpt = spawn(
        [*run_args(ckpt_dir, remote, "--log-json", str(events), backoff="1"), *cmd], env=env
    )
    wait_for(lambda: any(e["attempt"] == 3 for e in _log(log)), what="attempt 3", proc=ckpt)
    wait_for(lambda: _durable(remote, "state of attempt 3"), what="its save durable", proc=ckpt)

    metadata.aws_schedule("terminate", in_seconds=12)  # ckpt stops the child about 2 s in

    assert ckpt.wait() == ExitCode.PREEMPTED, ckpt.stderr()
    # The replacement machine: another --dir, the same remote.
    second = run_ckpt([*run_args(tmp_path / "elsewhere", remote), *cmd], cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    log_ = _log(log)
    first, after = _runs(remote)

    # What the child measured: work since its save, thrown away by each end;
    # the time from each end to the next start.
    lost = [_at(log_, n, "exit") - _at(log_, n, "save") for n in (1, 2, 3)]
    back = [_at(log_, n + 1, "start") - _at(log_, n, "exit") for n in (1, 2, 3)]
    a1, a2, a3 = first["attempts"]
    assert [a["outcome"] for a in (a1, a2, a3)] == ["failed", "failed", "preempted"]
    assert first["preemption"]["received"] > 0
    for a, expected in zip((a1, a2, a3), lost, strict=True):
        assert a["lost_seconds"] == pytest.approx(expected, abs=TOLERANCE), (a, lost)
    # Relaunches in the run: from the failure, the backoff (0.5 s at least)
    # included; ckpt starts the clock before the child's interpreter does.
    for a, expected in zip((a2, a3), back, strict=False):
        assert a["resume_seconds"] == pytest.approx(expected, abs=TOLERANCE), (a, back)
        assert a["resume_seconds"] >= 0.5, a
    assert first["costs"]["failures"] == 3
    assert first["costs"]["lost_seconds"] == pytest.approx(sum(lost), abs=3 * TOLERANCE)
    # The second run resumed the preempted one: its first attempt's time to
    # resume runs from the preemption's end, on the first run's record.
    (a4,) = after["attempts"]
    assert a4["resumed"] == _log_restored(log_, 4) != ""
    assert a4["resume_seconds"] == pytest.approx(back[2], abs=TOLERANCE), (a4, back)
    assert after["costs"] == {
        "failures": 0,
        "lost_seconds": 0.0,
        "resume_seconds": pytest.approx(back[2], abs=TOLERANCE),
    }

    # The `end` event carries the run's totals.
    (end,) = [e for e in map(json.loads, events.read_text().splitlines()) if e["event"] == "end"]
    assert end["failures"] == 3, end
    assert end["lost_seconds"] == pytest.approx(sum(lost), abs=3 * TOLERANCE), end
    assert end["resume_seconds"] == pytest.approx(back[0] + back[1], abs=2 * TOLERANCE), end

    # `ckpt ls --runs`: a total per run in words, a row per failure.
    text = ckpt_ok(["ls", str(remote), "--runs"], cwd=tmp_path).stdout
    runs_table, failures_table = text.split("\n\n")
    (row,) = [line for line in runs_table.splitlines() if line.startswith(first["run"] + " ")]
    assert re.search(r"3 failures, [\d.]+ s of work lost, [\d.]+ s resuming", row), text
    failure_rows = [line.split() for line in failures_table.splitlines()[1:]]
    assert [r[1] for r in failure_rows] == ["1", "2", "3"], text
    assert "0 failures, " in text and " resuming" in text, text
    doc = json.loads(ckpt_ok(["ls", str(remote), "--json"], cwd=tmp_path).stdout)
    listed = {r["run"]: r for r in doc["runs"]}
    assert listed[first["run"]]["costs"]["failures"] == 3
    assert [a["lost_seconds"] for a in listed[first["run"]]["attempts"]] == pytest.approx(
        lost, abs=TOLERANCE
    )
    assert listed[after["run"]]["attempts"][0]["resume_seconds"] == pytest.approx(
        back[2], abs=TOLERANCE
    )

    # `ckpt timeline`: by default the newest run and the failed one it continued.
    shown = ckpt_ok(["timeline", str(remote)], cwd=tmp_path).stdout
    assert first["run"] in shown and after["run"] in shown, shown
    assert "2 runs, 4 attempts: 3 failures" in shown, shown
    table = shown.split("\n\n")[-1].splitlines()
    assert [line.split()[0] for line in table[1:]] == ["1", "2", "3", "4"], shown
    for name in ("t.html", "t.svg"):
        res = ckpt_ok(["timeline", str(remote), "--out", str(tmp_path / name)], cwd=tmp_path)
        assert f"written to {tmp_path / name}" in res.stderr, res.stderr
        raw = (tmp_path / name).read_text()
        assert "http" not in raw.replace("http://www.w3.org/2000/svg", ""), "fetches nothing"
        if name.endswith(".html"):
            parser = _Text()
            parser.feed(raw)
            parser.close()
            words = " ".join(parser.text)
        else:
            words = " ".join(ET.fromstring(raw).itertext())
        for n in (1, 2, 3, 4):
            assert f"attempt {n}:" in words, (n, words)
        assert first["run"] in words and after["run"] in words


def _log_restored(log: list[dict[str, Any]], attempt: int) -> str:
    (restored,) = [e["restored"] for e in log if e["attempt"] == attempt and e["event"] == "start"]
    return str(restored)


#: A record as ckpt wrote it before it recorded costs (no `ended`, `outcome`,
#: `resumed` per attempt, no `snapshots`), its host carrying escapes and
#: markup, as a crafted repository might.
OLD = {
    "format": "ckpt-run",
    "version": 1,
    "run": "20260101T000000-0a0a0a",
    "host": "old\x1b]0;pwned\x07<b>[red]vm",
    "pid": 7,
    "started": 1767225600.0,
    "ended": 1767225700.0,
    "attempts": [
        {
            "number": 1,
            "started": 1767225600.0,
            "seconds": 40.0,
            "exit": "exit code 75",
            "status": 75,
        },
        {"number": 2, "started": 1767225650.0, "seconds": 50.0, "exit": "exit code 0", "status": 0},
    ],
    "preemption": None,
    "exit_status": 0,
    "outcome": "succeeded",
}


def test_an_old_record_is_listed_and_drawn_with_its_costs_unknown(
    tmp_path: Path, remote: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "state.txt").write_text("1")
    ckpt_ok(["push", str(src), str(remote)], cwd=tmp_path)  # a repository, no run yet
    (remote / "runs").mkdir()
    (remote / "runs" / f"{OLD['run']}.json").write_text(json.dumps(OLD))

    text = ckpt_ok(["ls", str(remote), "--runs"], cwd=tmp_path)
    assert "1 failure, work lost unknown, time resuming unknown" in text.stdout, text.stdout
    doc = json.loads(ckpt_ok(["ls", str(remote), "--json"], cwd=tmp_path).stdout)
    (run,) = doc["runs"]
    assert run["costs"] == {"failures": 1, "lost_seconds": None, "resume_seconds": None}
    assert [a["outcome"] for a in run["attempts"]] == ["failed", "succeeded"]
    shown = ckpt_ok(["timeline", str(remote)], cwd=tmp_path)
    svg = ckpt_ok(["timeline", str(remote), "--out", str(tmp_path / "old.svg")], cwd=tmp_path)
    for out in (text.stdout, text.stderr, shown.stdout, shown.stderr, svg.stdout, svg.stderr):
        assert "\x1b" not in out and "\x07" not in out, out
    assert "old\\x1b]0;pwned\\x07<b>[red]vm" in shown.stdout, shown.stdout
    root = ET.parse(tmp_path / "old.svg").getroot()
    words = " ".join(root.itertext())
    assert "attempt 1:" in words and "attempt 2:" in words
    assert "old\\x1b]0;pwned\\x07<b>[red]vm" in words  # escaped for XML, shown as text


#: Logs like CHILD (with its pid), saves, then attempt 1 waits to be killed;
#: a later attempt exits 0.
WAITER = (
    CHILD.split("    if n <= 2:", maxsplit=1)[0].replace(
        '"t": time.time(),', '"t": time.time(), "pid": os.getpid(),'
    )
    + """
    while n == 1:
        time.sleep(0.05)
    note("exit")
"""
)


def test_a_run_killed_9_then_resumed_elsewhere_ends_at_its_last_sign_of_life(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    """Run 1 saves, its save is durable, then ckpt and the child are killed
    -9 (no end recorded). Run 2 restores it elsewhere: run 1's attempt is
    `killed`, it ended between its save and the kill, so the work it lost
    and run 2's time to resume lie within what the test saw."""
    log = tmp_path / "child.log"
    cmd = [*script(tmp_path, "waiter.py", WAITER), str(log)]
    first = spawn([*run_args(ckpt_dir, remote), *cmd])
    wait_for(lambda: _durable(remote, "state of attempt 1"), what="the save", proc=first)
    wait_for(lambda: _runs(remote)[0]["snapshots"], what="the record of it", proc=first)
    (child,) = {e["pid"] for e in _log(log)}
    first.extra_pids.append(child)
    killed_at = time.time()
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    os.kill(child, signal.SIGKILL)

    second = run_ckpt([*run_args(tmp_path / "elsewhere", remote), *cmd], cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    saved, started = _at(_log(log), 1, "save"), _at(_log(log), 2, "start")
    doc = json.loads(ckpt_ok(["ls", str(remote), "--json"], cwd=tmp_path).stdout)
    before, after = doc["runs"]
    (killed,) = before["attempts"]
    (resumed,) = after["attempts"]
    assert killed["outcome"] == "killed" and before["outcome"] is None
    assert 0 <= killed["lost_seconds"] <= killed_at - saved + TOLERANCE, (killed, saved)
    assert started - killed_at - TOLERANCE <= resumed["resume_seconds"], resumed
    assert resumed["resume_seconds"] <= started - saved + TOLERANCE, (resumed, saved)
    text = ckpt_ok(["ls", str(remote), "--runs"], cwd=tmp_path).stdout
    assert "killed" in text.split("\n\n")[1], text
