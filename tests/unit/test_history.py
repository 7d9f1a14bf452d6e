"""The run history (cli/ckpt_cli/history.py) on a real local backend: record
format, what load_runs skips, the background writer, and a remote that fails."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from ckpt_cli import history
from ckpt_cli.backends.local import LocalBackend
from ckpt_cli.errors import RemoteError
from ckpt_cli.history import (
    FORMAT,
    MAX_RECORD,
    VERSION,
    RunHistory,
    attempts_before,
    changed_at,
    load_runs,
    parse_record,
    run_key,
)
from ckpt_cli.manifest import Entry


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    return LocalBackend(tmp_path / "remote")


def _record(run: str, started: float, attempts: int) -> dict[str, object]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "run": run,
        "started": started,
        "attempts": [{"number": i + 1} for i in range(attempts)],
    }


def test_written_record_round_trips_and_counts(backend: LocalBackend) -> None:
    h = RunHistory(backend, "run-a")
    h.start()
    h.attempt_started(4)
    h.attempt_ended(4, 75, "exit code 75", 1.23456)
    h.attempt_started(5)
    h.preempted({"cloud": "gcp", "action": "preempted", "detail": "x", "deadline": None})
    h.finish(79, "preempted")
    assert h.close(timeout=10)

    (run,) = load_runs(backend)
    assert run["run"] == "run-a" and run["outcome"] == "preempted" and run["exit_status"] == 79
    assert [(a["number"], a["exit"]) for a in run["attempts"]] == [(4, "exit code 75"), (5, None)]
    assert run["attempts"][0]["seconds"] == 1.235
    assert run["preemption"]["cloud"] == "gcp" and run["preemption"]["received"] > 0
    assert attempts_before([run]) == 2
    assert attempts_before([run], exclude="run-a") == 0


def test_load_runs_orders_by_start_and_skips_what_is_not_a_record(
    backend: LocalBackend,
) -> None:
    backend.write(run_key("b"), json.dumps(_record("b", 200.0, 1)).encode())
    backend.write(run_key("a"), json.dumps(_record("a", 100.0, 2)).encode())
    backend.write(run_key("garbage"), b"\x00{not json")
    backend.write(run_key("foreign"), json.dumps({"format": "other", "version": 1}).encode())
    backend.write(run_key("future"), json.dumps({**_record("f", 1.0, 9), "version": 99}).encode())
    backend.write("runs/not-a-record.txt", b"ignored")
    backend.write("runs/../escape.json", b"{}")  # a key outside the pattern
    runs = load_runs(backend)
    assert [r["run"] for r in runs] == ["a", "b"]
    assert attempts_before(runs) == 3


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        json.dumps({**_record("r", 1.0, 1), "attempts": "many"}).encode(),
        json.dumps({**_record("r", 1.0, 1), "attempts": [1, 2]}).encode(),
        json.dumps({**_record("r", 1.0, 1), "started": "yesterday"}).encode(),
        json.dumps({**_record("r", 1.0, 1), "run": 7}).encode(),
        b" " * (MAX_RECORD + 1),
    ],
    ids=["empty", "list", "attempts-str", "attempts-ints", "started-str", "run-int", "huge"],
)
def test_parse_record_refuses(raw: bytes) -> None:
    assert parse_record(raw) is None


def test_empty_remote_has_no_runs(backend: LocalBackend) -> None:
    assert load_runs(backend) == []


class FlakyBackend(LocalBackend):
    """A real local backend whose writes fail while `down` is set."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.down = threading.Event()
        self.failed = 0

    def write(self, key: str, data: bytes) -> None:
        if self.down.is_set():
            self.failed += 1
            raise RemoteError(f"writing {key} failed: connection refused")
        super().write(key, data)


def test_failing_writes_are_reported_once_and_retried_until_close(tmp_path: Path) -> None:
    backend = FlakyBackend(tmp_path / "remote")
    errors: list[str] = []
    backend.down.set()
    h = RunHistory(backend, "run-x", on_error=errors.append)
    h.RETRY = 0.05
    h.start()
    h.attempt_started(1)
    h.attempt_ended(1, 0, "exit code 0", 1.0)
    h.finish(0, "succeeded")
    deadline = threading.Event()
    while backend.failed < 3 and not deadline.wait(0.02):
        pass
    assert len(errors) == 1, errors  # one report for the streak
    assert "run history runs/run-x.json not written" in errors[0]
    backend.down.clear()  # the remote comes back before close gives up
    assert h.close(timeout=30)
    (run,) = load_runs(backend)
    assert run["outcome"] == "succeeded" and run["attempts"][0]["exit"] == "exit code 0"


def test_close_gives_up_after_its_timeout_when_the_remote_stays_down(tmp_path: Path) -> None:
    backend = FlakyBackend(tmp_path / "remote")
    backend.down.set()
    h = RunHistory(backend, "run-y", on_error=lambda m: None)
    h.start()
    h.finish(1, "failed")
    assert h.close(timeout=0.3) is False
    h._thread.join(timeout=5)
    assert not h._thread.is_alive(), "the writer stops once close gave up"
    assert load_runs(backend) == []


# ---------------------------------------------------------------- what failures cost


def test_a_record_carries_the_facts_and_what_they_cost(backend: LocalBackend) -> None:
    """Attempt 1 saved at t0+2 (the snapshot after its exit says so), failed
    at t0+5; attempt 2 started 3 s later: 3 s lost, 3 s resuming."""
    h = RunHistory(backend, "run-c")
    h.start()
    t0 = round(time.time()) - 100.0  # whole seconds: the record rounds to ms
    h.attempt_started(1, resumed="")
    h.record["attempts"][0]["started"] = t0  # as if launched then
    h.snapshot_taken("s1", 1, captured=t0 + 5.5, changed=t0 + 2)
    h.attempt_ended(1, 75, "exit code 75", 5.0, ended=t0 + 5, outcome="failed")
    h.attempt_started(2, resumed="s1")
    h.record["attempts"][1]["started"] = t0 + 8
    h.attempt_ended(2, 0, "exit code 0", 1.0, ended=t0 + 9, outcome="succeeded")
    assert h.costs() == {"failures": 1, "lost_seconds": 3.0, "resume_seconds": 3.0}
    h.finish(0, "succeeded")
    assert h.close(timeout=10)
    (run,) = load_runs(backend)
    one, two = run["attempts"]
    assert (one["outcome"], one["lost_seconds"], one["resumed"]) == ("failed", 3.0, "")
    assert (two["resume_seconds"], two["resumed"]) == (3.0, "s1")
    assert run["snapshots"] == [{"id": "s1", "attempt": 1, "captured": t0 + 5.5, "changed": t0 + 2}]
    assert run["costs"]["failures"] == 1 and run["seen"] >= run["ended"] - 1


def test_a_run_that_follows_a_failed_one_counts_its_first_relaunch(backend: LocalBackend) -> None:
    earlier = {
        "format": FORMAT,
        "version": VERSION,
        "run": "before",
        "started": 10.0,
        "ended": 60.0,
        "outcome": "preempted",
        "attempts": [
            {"number": 1, "started": 10.0, "ended": 50.0, "outcome": "preempted", "resumed": ""}
        ],
        "snapshots": [{"id": "s1", "attempt": 1, "captured": 40.0, "changed": None}],
    }
    h = RunHistory(backend, "after", earlier=[earlier])
    h.attempt_started(2, resumed="s1")
    (a,) = h.record["attempts"]
    assert a["resume_seconds"] == pytest.approx(time.time() - 50.0, abs=5)
    assert h.costs()["failures"] == 0


def test_the_record_keeps_the_newest_snapshots(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history, "MAX_SNAPSHOTS", 3)
    h = RunHistory(backend, "run-s")
    for i in range(5):
        h.snapshot_taken(f"s{i}", 1, captured=100.0 + i, changed=None)
    assert [s["id"] for s in h.record["snapshots"]] == ["s2", "s3", "s4"]
    assert h.record["snapshots_dropped"] == 2


def test_a_running_record_is_rewritten_while_nothing_changes(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`seen`: the last sign of life a run killed -9 leaves."""
    monkeypatch.setattr(history, "ALIVE", 0.05)
    h = RunHistory(backend, "run-alive")
    h.start()
    h.attempt_started(1)
    first = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        runs = load_runs(backend)
        if runs and first is None:
            first = runs[0]["seen"]
        elif runs and runs[0]["seen"] > first:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the record's seen was never refreshed")
    h.finish(0, "succeeded")
    assert h.close(timeout=10)


def test_changed_at_is_the_newest_mtime_of_new_content() -> None:
    old = [
        Entry("a", "file", size=1, mtime_ns=5 * 10**9, chunks=("x",)),
        Entry("b", "file", size=1, mtime_ns=6 * 10**9, chunks=("y",)),
    ]
    same_content_touched = Entry("a", "file", size=1, mtime_ns=50 * 10**9, chunks=("x",))
    rewritten = Entry("b", "file", size=1, mtime_ns=7 * 10**9, chunks=("z",))
    new = Entry("c", "file", size=1, mtime_ns=8 * 10**9, chunks=("w",))
    assert changed_at([same_content_touched, rewritten], old) == 7.0
    assert changed_at([same_content_touched, rewritten, new], old) == 8.0
    assert changed_at([same_content_touched, old[1]], old) is None
    assert changed_at([Entry("d", "dir", mtime_ns=9 * 10**9)], None) is None
    assert changed_at(old, None) == 6.0
