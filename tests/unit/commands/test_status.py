"""`ckpt status`'s lines from a supervisor's reply (commands/status.describe):
every field as the reply gives it, a number that is not one as "?"."""

from __future__ import annotations

from typing import Any

from ckpt_cli.commands.status import describe

REPLY: dict[str, Any] = {
    "run": "r1",
    "dir": "/ck",
    "remote": "s3://b/run",
    "child_pid": 4242,
    "attempt": 2,
    "last_snapshot": "773f5ad3",
    "last_snapshot_age": 5.0,
    "backlog_bytes": 2048,
    "backlog_files": 1,
    "rate": 0,
    "snapshots": 3,
    "bytes_uploaded": 4096,
}


def test_a_run_is_five_lines() -> None:
    assert describe(REPLY) == [
        "run r1: /ck -> s3://b/run",
        "  child: pid 4242, attempt 2",
        "  newest durable snapshot: 773f5ad3, 5s ago",
        "  upload backlog: 2.0 KiB in 1 file; 0 B/s",
        "  snapshots: 3, 4.0 KiB uploaded",
    ]


def test_what_is_not_a_number_is_shown_as_a_question_mark() -> None:
    odd = {**REPLY, "backlog_bytes": "lots", "backlog_files": 1.5, "rate": float("nan")}
    odd |= {"last_snapshot_age": True, "child_pid": None}
    lines = describe(odd)
    assert lines[1] == "  child: not running, attempt 2"
    assert lines[2] == "  newest durable snapshot: none yet"
    assert lines[3] == "  upload backlog: ? in ? files; ?/s"


def test_files_in_progress_errors_and_notices_get_a_line_each() -> None:
    waiting = [{"path": f"f{i}", "reason": "open for writing"} for i in range(5)]
    extra = {"waiting_for": waiting, "waiting_seconds": 7, "settle_timeout": 120.0}
    extra |= {"last_error": "upload failed", "preemption": "aws terminate"}
    lines = describe({**REPLY, **extra})
    assert lines[5:] == [
        "  snapshot waits for: f0 (open for writing), f1 (open for writing), "
        "f2 (open for writing) and 2 more; 7s so far (at most 120s, --settle-timeout)",
        "  last error: upload failed",
        "  preemption notice: aws terminate",
    ]
