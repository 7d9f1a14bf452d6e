"""What failures cost (cli/ckpt_cli/costs.py), from hand-made run records:
the README's definitions (What failures cost) checked number by number.
Times are plain seconds; no clock is read."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ckpt_cli.costs import Ledger, attempt_outcome, chain, describe, duration
from ckpt_cli.history import annotate


def att(
    number: int,
    started: float | None,
    ended: float | None,
    outcome: str | None,
    resumed: str | None = "",
    **extra: Any,
) -> dict[str, Any]:
    a: dict[str, Any] = {"number": number, "started": started, "exit": f"exit of {number}"}
    if ended is not None:
        a.update(ended=ended, outcome=outcome, status=0 if outcome == "succeeded" else 75)
    if resumed is not None:
        a["resumed"] = resumed
    return {**a, **extra}


def snap(sid: str, attempt: int, captured: float, changed: float | None = None) -> dict[str, Any]:
    return {"id": sid, "attempt": attempt, "captured": captured, "changed": changed}


def rec(run: str, started: float, attempts: list[Any], snaps: list[Any], **extra: Any) -> Any:
    return {
        "format": "ckpt-run",
        "version": 1,
        "run": run,
        "host": "vm",
        "started": started,
        "ended": None,
        "attempts": attempts,
        "preemption": None,
        "snapshots": snaps,
        **extra,
    }


def costs_of(*records: Any) -> Ledger:
    return Ledger(list(records))


def test_a_relaunch_keeps_what_the_snapshot_after_the_exit_captured() -> None:
    """The dir is kept as attempt 1 left it: the child saved at 140, after
    the last snapshot (captured 120), and the snapshot taken right after the
    exit (captured 151) made it durable: only 150 - 140 is lost."""
    a = rec(
        "A",
        99,
        [att(1, 100, 150, "failed"), att(2, 152, 170, "succeeded", resumed="s2")],
        [snap("s1", 1, 120, 119), snap("s2", 1, 151, 140)],
    )
    first, second = costs_of(a).runs["A"].attempts
    assert first.failure and first.lost == pytest.approx(10)
    assert first.spans == [("A", 1, 140, 150)]
    assert second.resume == pytest.approx(2) and second.after == ("A", 1)
    assert first.followed_by is second and not first.provisional


def test_without_the_snapshot_after_the_exit_the_last_one_counts() -> None:
    a = rec(
        "A",
        99,
        [att(1, 100, 150, "failed"), att(2, 152, 170, "succeeded", resumed="s1")],
        [snap("s1", 1, 120, 119)],
    )
    assert costs_of(a).runs["A"].attempts[0].lost == pytest.approx(31)


def test_a_snapshots_moment_is_its_capture_not_when_its_upload_ended() -> None:
    """No file time: the capture (ckpt began reading), never a later time."""
    a = rec(
        "A",
        99,
        [att(1, 100, 150, "failed"), att(2, 151, 160, "succeeded", resumed="s1")],
        [snap("s1", 1, 120)],
    )
    ledger = costs_of(a)
    assert ledger.runs["A"].snapshots[0].moment == 120
    assert ledger.runs["A"].attempts[0].lost == pytest.approx(30)


def test_a_file_time_is_bounded_by_the_previous_capture_and_the_attempt() -> None:
    """A changed file with an old mtime (copied with its time) counts from
    the previous capture; one in the future, from the capture; a snapshot
    after the exit holds what the child left, at the end at most."""
    a = rec(
        "A",
        99,
        [att(1, 100, 150, "failed"), att(2, 151, 170, "succeeded")],
        [
            snap("s0", 1, 110, 5),
            snap("s1", 1, 120, 50),
            snap("s2", 1, 130, 999),
            snap("s3", 1, 160, 155),
        ],
    )
    moments = [s.moment for s in costs_of(a).runs["A"].snapshots]
    assert moments == [100, 110, 130, 150]


def test_a_failure_before_any_snapshot_loses_its_attempt_and_no_more() -> None:
    a = rec(
        "A",
        99,
        [
            att(1, 100, 130, "failed"),
            att(2, 131, 170, "failed"),
            att(3, 172, 200, "succeeded"),
        ],
        [],
    )
    one, two, three = costs_of(a).runs["A"].attempts
    assert (one.lost, two.lost, three.lost) == (30, 39, None)
    assert (two.resume, three.resume) == (1, 2)
    totals = costs_of(a).runs["A"].totals()
    assert totals == {"failures": 2, "lost_seconds": 69.0, "resume_seconds": 3.0}


def test_a_preempted_run_resumed_elsewhere_counts_what_was_durable() -> None:
    """Run B on a replacement machine restored s1: A's preemption lost from
    s1's moment to its end, and B resumed 320 s after that end."""
    a = rec(
        "A",
        99,
        [att(1, 100, 200, "preempted")],
        [snap("s1", 1, 150)],
        outcome="preempted",
        preemption={"cloud": "gcp", "received": 190},
    )
    b = rec("B", 500, [att(2, 520, 600, "succeeded", resumed="s1")], [snap("s2", 2, 560)])
    ledger = costs_of(a, b)
    (lost,) = ledger.runs["A"].attempts
    (back,) = ledger.runs["B"].attempts
    assert lost.outcome == "preempted" and lost.lost == pytest.approx(50)
    assert not lost.provisional
    assert back.resume == pytest.approx(320) and back.after == ("A", 1)
    assert ledger.runs["B"].continues == "A"
    assert ledger.runs["B"].totals() == {"failures": 0, "lost_seconds": 0.0, "resume_seconds": 320}
    assert ledger.runs["A"].preemption == 190


def test_restoring_an_older_snapshot_loses_more() -> None:
    """s1 turned out damaged and B restored s0: the work since s0 is lost."""
    a = rec(
        "A",
        99,
        [att(1, 100, 200, "preempted")],
        [snap("s0", 1, 120), snap("s1", 1, 150)],
    )
    b = rec("B", 500, [att(2, 520, 600, "succeeded", resumed="s0")], [])
    assert costs_of(a, b).runs["A"].attempts[0].lost == pytest.approx(80)


def test_with_no_next_attempt_the_newest_snapshot_is_what_a_new_run_restores() -> None:
    a = rec(
        "A",
        99,
        [att(1, 100, 200, "preempted")],
        [snap("s0", 1, 120), snap("s1", 1, 190)],
        outcome="preempted",
    )
    (one,) = costs_of(a).runs["A"].attempts
    assert one.lost == pytest.approx(10) and one.provisional


def test_a_run_killed_without_an_end_ends_at_its_last_sign_of_life() -> None:
    a = rec("A", 99, [att(1, 100, None, None)], [snap("s1", 1, 150)], seen=180)
    alone = costs_of(a).runs["A"].attempts[0]
    assert alone.outcome is None and alone.end is None and alone.lost is None  # running?
    b = rec("B", 300, [att(2, 310, 350, "succeeded", resumed="s1")], [])
    ledger = costs_of(a, b)
    killed = ledger.runs["A"].attempts[0]
    assert killed.outcome == "killed" and killed.end_seen and killed.end == 180
    assert killed.lost == pytest.approx(30)
    assert ledger.runs["B"].attempts[0].resume == pytest.approx(130)


def test_a_stopped_run_is_no_failure_and_its_successor_did_not_resume_it() -> None:
    a = rec("A", 99, [att(1, 100, 200, "stopped")], [snap("s1", 1, 150)], outcome="stopped")
    b = rec("B", 500, [att(2, 520, 600, "succeeded", resumed="s1")], [])
    ledger = costs_of(a, b)
    assert ledger.runs["A"].failures == 0 and ledger.runs["A"].attempts[0].lost is None
    assert ledger.runs["B"].continues is None
    assert ledger.runs["B"].attempts[0].resume is None
    assert ledger.runs["B"].totals()["resume_seconds"] == 0
    assert [r.run for r in chain(ledger, "B")] == ["B"]


def test_lost_work_reaches_back_into_the_attempt_it_started_from() -> None:
    """A multi-node run (ranks relaunch from the newest step all committed,
    `resumed`): attempt 3 started from s0, older than what attempt 2 started
    from, so attempt 2's failure also threw away s1 - s0 of attempt 1."""
    a = rec(
        "A",
        99,
        [
            att(1, 100, 200, "failed"),
            att(2, 210, 260, "failed", resumed="s1"),
            att(3, 270, 300, "succeeded", resumed="s0"),
        ],
        [snap("s0", 1, 120), snap("s1", 1, 150), snap("s2", 1, 180)],
        rank=0,
    )
    one, two, _ = costs_of(a).runs["A"].attempts
    assert one.lost == pytest.approx(50) and one.spans == [("A", 1, 150, 200)]
    assert two.lost == pytest.approx(80)
    assert two.spans == [("A", 2, 210, 260), ("A", 1, 120, 150)]


def test_ranks_are_separate_lanes() -> None:
    r0 = rec("A0", 99, [att(1, 100, 200, "preempted")], [], rank=0)
    r1 = rec("A1", 99, [att(1, 100, 200, "preempted")], [], rank=1)
    b1 = rec("B1", 400, [att(2, 410, 500, "succeeded")], [], rank=1)
    ledger = costs_of(r0, r1, b1)
    assert ledger.runs["B1"].continues == "A1"
    assert ledger.runs["A0"].attempts[0].followed_by is None


def test_an_old_record_counts_its_failures_and_knows_no_costs() -> None:
    """A record written before these fields: attempts with a status only."""
    old = {
        "format": "ckpt-run",
        "version": 1,
        "run": "old",
        "started": 100.0,
        "ended": 300.0,
        "outcome": "succeeded",
        "attempts": [
            {"number": 1, "started": 100.0, "seconds": 50.0, "exit": "exit code 75", "status": 75},
            {"number": 2, "started": 160.0, "seconds": 100.0, "exit": "exit code 0", "status": 0},
        ],
        "preemption": None,
    }
    rc = costs_of(old).runs["old"]
    assert [a.outcome for a in rc.attempts] == ["failed", "succeeded"]
    assert not rc.recorded
    assert rc.totals() == {"failures": 1, "lost_seconds": None, "resume_seconds": None}
    assert describe(rc.totals()) == "1 failure, work lost unknown, time resuming unknown"
    (shown,) = annotate([old])
    assert shown["costs"]["lost_seconds"] is None
    assert shown["attempts"][0]["outcome"] == "failed"


def test_crafted_fields_are_unknown_not_a_crash() -> None:
    crafted = rec(
        "X",
        99,
        [
            {"number": "one", "started": "then", "ended": 1e400, "outcome": "exploded"},
            {"number": 2, "started": 120, "ended": 110, "outcome": "failed", "resumed": 7},
            {"number": 3, "started": 130, "ended": 140, "outcome": "failed", "resumed": "loop"},
        ],
        [1, {"id": 5}, {"id": "n", "captured": float("nan")}, snap("loop", 3, 135)],
        seen="soon",
        snapshots_dropped="many",
        rank=0,  # relaunches start from `resumed`
    )
    ledger = costs_of(crafted)
    rc = ledger.runs["X"]
    assert [s.id for s in rc.snapshots] == ["loop"]
    assert rc.attempts[1].lost is None  # started from what no record knows
    assert rc.attempts[2].lost is None  # a snapshot of its own attempt: a loop, cut short
    json.dumps(annotate([crafted]), allow_nan=False)


def test_a_snapshot_list_cut_short_makes_older_relaunches_unknown() -> None:
    a = rec(
        "A",
        99,
        [att(1, 100, 150, "failed"), att(2, 151, 300, "failed"), att(3, 301, 400, "succeeded")],
        [snap("s9", 2, 290)],
        snapshots_dropped=40,
    )
    one, two, _ = costs_of(a).runs["A"].attempts
    assert one.lost is None  # its snapshots were dropped from the record
    assert two.lost == pytest.approx(10)


def test_the_outcome_of_an_attempt() -> None:
    assert attempt_outcome(0, preempted=False, stopped=False) == "succeeded"
    assert attempt_outcome(0, preempted=True, stopped=False) == "succeeded"
    assert attempt_outcome(0, preempted=True, stopped=True) == "preempted"
    assert attempt_outcome(143, preempted=True, stopped=True) == "preempted"
    assert attempt_outcome(143, preempted=False, stopped=True) == "stopped"
    assert attempt_outcome(0, preempted=False, stopped=True) == "stopped"
    assert attempt_outcome(75, preempted=False, stopped=False) == "failed"


def test_totals_in_words() -> None:
    totals = {"failures": 3, "lost_seconds": 130.0, "resume_seconds": 41.0}
    assert describe(totals) == "3 failures, 2 min 10 s of work lost, 41 s resuming"
    one = {"failures": 1, "lost_seconds": 4.04, "resume_seconds": 0.9}
    assert describe(one) == "1 failure, 4.0 s of work lost, 0.9 s resuming"
    assert describe({"failures": 0, "lost_seconds": 0, "resume_seconds": 0}) == "0 failures"
    assert describe({"failures": 0, "lost_seconds": 0, "resume_seconds": 75}) == (
        "0 failures, 1 min 15 s resuming"
    )
    assert [duration(s) for s in (0, 9.96, 59.4, 3600 * 3 + 120, 86400 * 3 + 3600)] == [
        "0.0 s",
        "10.0 s",
        "59 s",
        "3 h 02 min",
        "3 d 01 h",
    ]


def test_chain_goes_back_through_failed_runs_only() -> None:
    a = rec("A", 10, [att(1, 10, 20, "succeeded")], [])
    b = rec("B", 30, [att(2, 30, 40, "preempted")], [])
    c = rec("C", 50, [], [])  # preempted before its launch: no attempt
    d = rec("D", 60, [att(3, 60, 70, "failed")], [])
    e = rec("E", 80, [att(4, 80, None, None)], [])
    ledger = costs_of(a, b, c, d, e)
    assert [r.run for r in chain(ledger, "E")] == ["B", "D", "E"]
    assert ledger.runs["D"].attempts[0].resume == pytest.approx(20)
    assert [r.run for r in chain(ledger, "E", limit=2)] == ["D", "E"]
