"""What a stop signal means (ckpt_cli.run.signals.StopState), on a clock of
numbers: the first, the same one again within the echo window, a second one,
the OS's stop after ckpt stopped the child for a preemption notice."""

from __future__ import annotations

import signal

from ckpt_cli.run.signals import ECHO_WINDOW, Stop, StopState


def test_the_first_stop_is_recorded() -> None:
    s = StopState()
    assert s.receive(signal.SIGINT, 10.0) is Stop.FIRST
    assert (s.signal, s.at) == (signal.SIGINT, 10.0)


def test_a_stop_within_the_echo_window_is_the_same_one_delivered_twice() -> None:
    s = StopState()
    s.receive(signal.SIGTERM, 10.0)
    assert s.receive(signal.SIGTERM, 10.0 + ECHO_WINDOW / 2) is Stop.ECHO
    assert s.receive(signal.SIGTERM, 10.0 + ECHO_WINDOW) is Stop.SECOND
    assert s.signal == signal.SIGTERM  # the first one stays the run's


def test_a_second_stop_of_another_kind_also_hurries() -> None:
    s = StopState()
    s.receive(signal.SIGTERM, 10.0)
    assert s.receive(signal.SIGINT, 20.0) is Stop.SECOND


def test_the_os_stop_after_the_notice_stop_asks_for_nothing_more_once() -> None:
    s = StopState()
    s.stop_for_notice(50.0)
    assert (s.signal, s.at) == (signal.SIGTERM, 50.0)
    assert s.receive(signal.SIGTERM, 50.1) is Stop.AFTER_NOTICE
    assert (s.signal, s.at) == (signal.SIGTERM, 50.1)
    # Then a stop is a stop again: one within the echo window is the same one,
    # a later one asks to hurry.
    assert s.receive(signal.SIGTERM, 50.2) is Stop.ECHO
    assert s.receive(signal.SIGINT, 60.0) is Stop.SECOND
