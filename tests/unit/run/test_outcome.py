"""The run's outcome (ckpt_cli.run.flush.outcome): the exit status, the word
for the run history and the line that says so, from values alone."""

from __future__ import annotations

import signal
from typing import Any

from ckpt import _contract as contract
from ckpt_cli.run.flush import Outcome, outcome

WHERE: dict[str, Any] = {"display": "s3://b/run", "directory": "/ck"}


def decide(status: int, **kw: Any) -> Outcome:
    values: dict[str, Any] = {
        "flushed": True,
        "abandoned": False,
        "stop_signal": None,
        "preempted": None,
    }
    values.update(kw)
    return outcome(status, **values, **WHERE)


def test_success_and_failure_pass_the_status_on() -> None:
    assert decide(0) == Outcome(0, "succeeded")
    assert decide(3) == Outcome(3, "failed")
    assert decide(3, flushed=False) == Outcome(3, "failed")


def test_a_success_whose_final_state_is_not_durable_is_unavailable() -> None:
    out = decide(0, flushed=False)
    assert (out.status, out.word) == (contract.ExitCode.UNAVAILABLE, "not durable")
    assert "s3://b/run" in out.error and "/ck still has it" in out.error


def test_a_stop_is_128_plus_the_signal_when_flushed_or_abandoned() -> None:
    term = int(signal.SIGTERM)
    assert decide(143, stop_signal=term) == Outcome(128 + term, "stopped")
    abandoned = decide(143, stop_signal=term, flushed=False, abandoned=True)
    assert abandoned == Outcome(128 + term, "stopped")
    out = decide(143, stop_signal=term, flushed=False)
    assert (out.status, out.word) == (contract.ExitCode.UNAVAILABLE, "not durable")
    assert out.error.startswith("stopped by SIGTERM, but the final state is not durable")


def test_preempted_says_whether_the_final_state_is_durable() -> None:
    code = contract.ExitCode.PREEMPTED
    out = decide(code, preempted="aws terminate")
    assert (out.status, out.word, out.error) == (code, "preempted", "")
    assert out.warning.startswith("preempted (aws terminate): the final state is durable")
    out = decide(code, preempted="aws terminate", flushed=False, stop_signal=15)
    assert (out.status, out.word, out.warning) == (code, "preempted", "")
    assert f"(exit {int(code)})" in out.error


def test_a_child_done_on_its_own_under_a_notice_succeeded() -> None:
    assert decide(0, preempted="gcp preempted") == Outcome(0, "succeeded")
