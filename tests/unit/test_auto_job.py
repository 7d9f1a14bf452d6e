"""worker's pure decisions: which automatic snapshot is due, what a flush is told."""

from __future__ import annotations

from ckpt_cli.manifest import Manifest
from ckpt_cli.snapshotter import SnapshotResult
from ckpt_cli.worker import auto_job, flush_answer

QUIET = dict(retry_at=0.0, try_at=None, dirty=False, quiet_at=0.0, probe_at=None)


def test_nothing_due_waits_for_the_rescan() -> None:
    assert auto_job(10.0, **QUIET, next_rescan=25.0) == (None, 15.0)
    assert auto_job(25.0, **QUIET, next_rescan=25.0) == ("rescan", 0.0)


def test_a_backoff_holds_every_automatic_snapshot() -> None:
    args = {**QUIET, "retry_at": 12.0, "dirty": True, "try_at": 1.0}
    assert auto_job(10.0, **args, next_rescan=5.0) == (None, -5.0)
    assert auto_job(10.0, **args, next_rescan=30.0) == (None, 2.0)
    assert auto_job(10.0, **{**args, "retry_at": 9.0}, next_rescan=30.0) == ("change", 0.0)


def test_changes_are_snapshotted_once_quiet() -> None:
    args = {**QUIET, "dirty": True, "quiet_at": 14.0}
    assert auto_job(10.0, **args, next_rescan=60.0) == (None, 4.0)
    assert auto_job(14.0, **args, next_rescan=60.0) == ("change", 0.0)


def test_a_busy_directory_is_probed_before_it_goes_quiet() -> None:
    args = {**QUIET, "dirty": True, "quiet_at": 20.0, "probe_at": 15.0}
    assert auto_job(10.0, **args, next_rescan=60.0) == (None, 5.0)
    assert auto_job(15.0, **args, next_rescan=60.0) == ("probe", 0.0)


def test_a_held_back_snapshot_is_tried_again_at_its_time() -> None:
    args = {**QUIET, "try_at": 12.0}
    assert auto_job(10.0, **args, next_rescan=60.0) == (None, 2.0)
    assert auto_job(12.5, **args, next_rescan=60.0) == ("change", 0.0)


def test_a_flush_hears_of_unreadable_files_and_is_not_retried() -> None:
    m = Manifest("abcd1234", 3, (), 1024, 1.0)
    result = SnapshotResult(m, None, unreadable={"a.pt": "Permission denied"})
    newest, error, retry = flush_answer(result, None, transient=False)
    assert newest == m and not retry
    assert (
        error is not None and "a.pt (Permission denied)" in error and "snapshot abcd1234" in error
    )


def test_a_flush_after_a_remote_failure_may_ask_again() -> None:
    assert flush_answer(None, "timed out", transient=True) == (None, "timed out", True)
    assert flush_answer(None, "torn", transient=False) == (None, "torn", False)
    m = Manifest("abcd1234", 3, (), 1024, 1.0)
    assert flush_answer(SnapshotResult(None, m), None, transient=False) == (m, None, True)
