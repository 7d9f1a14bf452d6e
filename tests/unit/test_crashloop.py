"""crashloop.Guard: when failures in a row make the restored snapshot suspect."""

from __future__ import annotations

from ckpt_cli.crashloop import Guard, Snap, progressed


def _end(g: Guard, attempt: int, *, base: str = "S", at: float = 0.0, **kw: object) -> object:
    args = {
        "attempt": attempt,
        "started_from": base,
        "launched": at,
        "exited": at + 1.0,
        "failed": True,
        "status": "exit code 75",
        "snaps": [],
    }
    args.update(kw)
    return g.ended(**args)  # type: ignore[arg-type]


def test_two_failures_in_a_row_make_the_restored_snapshot_suspect() -> None:
    g = Guard(2)
    assert _end(g, 1, at=10) is None
    verdict = _end(g, 2, at=20)
    assert verdict is not None
    assert verdict.suspect == ("S",)  # type: ignore[attr-defined]
    assert verdict.attempts == (1, 2)  # type: ignore[attr-defined]
    assert _end(g, 3, base="T", at=30) is None  # the streak starts over


def test_success_or_progress_ends_the_streak() -> None:
    g = Guard(2)
    _end(g, 1, at=10)
    assert _end(g, 2, at=20, failed=False) is None
    assert _end(g, 3, at=30) is None  # one failure again: not yet
    during = [Snap("P", 5, 30.5, "change")]  # written while attempt 4 ran
    assert _end(g, 4, at=30, snaps=during) is None
    assert _end(g, 5, at=40, snaps=during) is None  # 1 in a row again


def test_snapshots_the_exits_made_are_no_progress_and_are_suspect_too() -> None:
    g = Guard(2)
    exit_snap = Snap("E", 3, 11.5, "exit")  # after attempt 1 exited at 11
    assert not progressed([exit_snap], 10, 11)
    _end(g, 1, at=10)
    verdict = _end(g, 2, base="E", at=12, snaps=[exit_snap])
    assert verdict is not None and verdict.suspect == ("S", "E")  # type: ignore[attr-defined]


def test_nothing_restored_nothing_to_blame_and_off_is_off() -> None:
    g = Guard(2)
    assert _end(g, 1, base="") is None
    assert _end(g, 2, base="") is None
    off = Guard(0)
    assert _end(off, 1) is None and _end(off, 2) is None and _end(off, 3) is None
    three = Guard(3)
    assert _end(three, 1) is None and _end(three, 2) is None
    assert _end(three, 3) is not None
