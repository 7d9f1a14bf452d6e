"""The run history (cli/ckpt_cli/history.py) on a real local backend: record
format, what load_runs skips, the background writer, and a remote that fails."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from ckpt_cli.errors import RemoteError
from ckpt_cli.history import (
    FORMAT,
    MAX_RECORD,
    VERSION,
    RunHistory,
    attempts_before,
    load_runs,
    parse_record,
    run_key,
)
from ckpt_cli.remote import LocalBackend


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
