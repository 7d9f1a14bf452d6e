"""The preemption window (ckpt_cli.run.window): when the child is stopped,
its grace, the final flush's deadline, the run history's wait."""

from __future__ import annotations

import pytest

from ckpt_cli.run.preemption import GCP_WINDOW, Notice
from ckpt_cli.run.window import (
    FLUSH_BEYOND,
    NOTICE_GRACE_SHARE,
    NOTICE_RESERVE,
    NoticeBoard,
    PreemptionWindow,
)


def test_a_long_window_gives_the_child_half() -> None:
    w = PreemptionWindow.open(120.0, now=1000.0)
    assert (w.taken_at, w.deadline, w.stop_at) == (1000.0, 1120.0, 1060.0)
    assert w.seconds == 120.0


def test_a_short_window_keeps_the_reserve_for_the_stop_and_the_flush() -> None:
    w = PreemptionWindow.open(NOTICE_RESERVE + 4.0, now=0.0)
    assert w.stop_at == pytest.approx(4.0)
    assert PreemptionWindow.open(NOTICE_RESERVE / 2, now=0.0).stop_at == 0.0  # at once


def test_gcp_says_no_time_its_window_is_assumed() -> None:
    w = PreemptionWindow.open(None, now=0.0)
    assert w.deadline == GCP_WINDOW
    assert PreemptionWindow.open(-5.0, now=0.0).deadline == 0.0  # already past: none left


def test_the_grace_is_cut_to_a_share_of_what_is_left() -> None:
    w = PreemptionWindow.open(120.0, now=0.0)
    assert w.grace(30.0, now=0.0) == 30.0  # --grace fits
    assert w.grace(30.0, now=90.0) == pytest.approx(30.0 * NOTICE_GRACE_SHARE)
    assert w.grace(30.0, now=200.0) == 0.0


def test_the_flush_deadline_ends_a_little_after_the_machine_goes() -> None:
    w = PreemptionWindow.open(60.0, now=0.0)
    assert w.flush_deadline(1000.0) == 60.0 + FLUSH_BEYOND
    assert w.flush_deadline(30.0) == 30.0  # --flush-timeout comes first


def test_the_history_waits_until_the_deadline_but_at_least_a_second() -> None:
    w = PreemptionWindow.open(60.0, now=0.0)
    assert w.history_wait(10.0, now=0.0) == 10.0
    assert w.history_wait(10.0, now=55.0) == 5.0
    assert w.history_wait(10.0, now=100.0) == 1.0


def test_the_board_opens_a_window_once_per_notice() -> None:
    board = NoticeBoard()
    assert board.take(now=5.0, wall=1000.0) is None
    board.notice = Notice("aws", "terminate", 1100.0, "d")
    w = board.take(now=5.0, wall=1000.0)
    assert w is not None and w.deadline == 105.0
    assert board.take(now=6.0, wall=1001.0) is None
    assert board.window is w
