"""The end of a run: the final flush (snapshot the final state and wait
until it is durable), and the run's outcome, a pure decision from values
(exit status, a word for the run history, and the line that says so)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

from ckpt import _contract as contract
from ckpt_cli import console
from ckpt_cli.config import wait_limit
from ckpt_cli.policy import signal_name
from ckpt_cli.run.attempts import Signals
from ckpt_cli.run.clock import Clock
from ckpt_cli.run.reporter import Reporter
from ckpt_cli.run.signals import NOTICE_WAKE, STOP_SIGNALS, Stop, StopState
from ckpt_cli.run.window import NoticeBoard
from ckpt_cli.worker import Request, SnapshotWorker

#: A final flush that takes longer than this shows its progress (a bar on a
#: terminal, one line off one).
FLUSH_SHOWN = 1.0


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: int  # ckpt's exit status
    word: str  # for the run history and the `end` event
    error: str = ""  # a line said as an error
    warning: str = ""  # a line said as a warning


def outcome(
    status: int,
    *,
    flushed: bool,
    abandoned: bool,
    stop_signal: int | None,
    preempted: str | None,
    display: str,
    directory: str,
) -> Outcome:
    """The run's exit status from the loop's status and how the flush ended.
    preempted: the notice's "cloud action" (None: no notice); abandoned: a
    second stop signal abandoned the flush."""
    code = int(contract.ExitCode.PREEMPTED)
    if preempted is not None and status != 0:
        if flushed:
            return Outcome(
                contract.ExitCode.PREEMPTED,
                "preempted",
                warning=f"preempted ({preempted}): the final state is durable; "
                f"run `ckpt run` again on another machine to go on (exit {code})",
            )
        return Outcome(
            contract.ExitCode.PREEMPTED,
            "preempted",
            error=f"preempted ({preempted}) before the final state was durable in {display}; "
            f"the newest durable snapshot is what a new run restores (exit {code})",
        )
    if stop_signal is not None:
        if flushed or abandoned:
            return Outcome(128 + stop_signal, "stopped")
        return Outcome(
            contract.ExitCode.UNAVAILABLE,
            "not durable",
            error=f"stopped by {signal_name(stop_signal)}, but the final state is not "
            f"durable in {display}; the local directory {directory} still has it",
        )
    if status == 0 and not flushed:
        return Outcome(
            contract.ExitCode.UNAVAILABLE,
            "not durable",
            error="the child succeeded but its final state is not durable in "
            f"{display}; the local directory {directory} still has it",
        )
    return Outcome(status, "succeeded" if status == 0 else "failed")


class FinalFlush:
    """Snapshot the final state and wait until it is durable, retrying until
    --flush-timeout. A first stop signal lets it finish (flushing is what a
    stop asks for); a second one abandons it: no retry, no more waiting
    here. The snapshot thread still ends what it has begun (an upload is
    never cut short: the join after this bounds it), and `after_abandon`
    then says what became durable. A wait longer than FLUSH_SHOWN shows its
    progress (`console.Progress`)."""

    def __init__(
        self,
        worker: SnapshotWorker,
        *,
        timeout: float,
        clock: Clock,
        signals: Signals,
        stops: StopState,
        board: NoticeBoard,
        reporter: Reporter,
        lease_lost: Callable[[], bool],
    ) -> None:
        self.worker = worker
        self.timeout = timeout  # --flush-timeout
        self.clock = clock
        self.signals = signals
        self.stops = stops
        self.board = board
        self.reporter = reporter
        self.lease_lost = lease_lost
        self.abandoned: tuple[Request, int] | None = None  # the final request, the signal

    def run(self) -> bool:
        """True if the final state is durable."""
        with contextlib.ExitStack() as shown:
            return self._flush(shown)

    def _flush(self, shown: contextlib.ExitStack) -> bool:
        clock = self.clock
        deadline = clock.monotonic() + self.timeout
        show_at = clock.monotonic() + FLUSH_SHOWN
        bar: console.Progress | None = None
        pause = 0.5
        while True:
            req = self.worker.request("final")
            while not req.wait(0.05):
                if bar is None and clock.monotonic() >= show_at:
                    bar = shown.enter_context(console.Progress(self._line()))
                live = self.worker.snapshotter.live
                if bar is not None and live is not None:
                    bar.update(live[0].bytes_read, live[2])
                window = self.board.window
                if window is not None:
                    deadline = window.flush_deadline(deadline)
                if clock.monotonic() >= deadline:
                    self.reporter.not_durable(
                        f"not durable after {self.timeout:g}s (--flush-timeout)"
                    )
                    return False
                if self._abandon(req):
                    return False
            if req.error is None:
                m = req.manifest
                if m is not None:
                    self.reporter.durable(m.id)
                return True
            if not req.retryable or self.lease_lost() or clock.monotonic() + pause >= deadline:
                self.reporter.not_durable(f"failed: {req.error}")
                return False
            clock.sleep(pause)
            pause = min(pause * 2, 5.0)

    def _abandon(self, req: Request) -> bool:
        """Act on the signals that came: True if a second stop abandons the flush."""
        for sig in self.signals.wait(0):
            if sig == NOTICE_WAKE:
                window = self.board.take(self.clock.monotonic(), self.clock.time())
                if window is not None:  # bounds the flush
                    assert self.board.notice is not None
                    self.reporter.notice(self.board.notice, " during the final flush")
            if sig not in STOP_SIGNALS:
                continue
            kind = self.stops.receive(sig, self.clock.monotonic())
            if kind is Stop.AFTER_NOTICE:
                self.reporter.after_notice_stop(sig, "finishing the final snapshot")
            elif kind is Stop.SECOND:
                self.abandoned = (req, sig)
                self.reporter.flush_abandoned(sig)
                return True
            elif kind is Stop.FIRST:
                self.reporter.stop(sig)
                self.reporter.flush_stop(sig)
        return False

    def _line(self) -> str:
        limit = (
            "as long as it takes (--flush-timeout inf)"
            if wait_limit(self.timeout) is None
            else f"at most {self.timeout:g}s (--flush-timeout)"
        )
        return f"waiting for the final snapshot to be durable, {limit}"

    def after_abandon(self) -> bool:
        """Once the snapshot thread has stopped: what the abandoned flush left
        durable, said once. True if the final state is durable after all
        (its upload was under way and finished)."""
        if self.abandoned is None:
            return False
        req, sig = self.abandoned
        if req.done and req.error is None:
            m = req.manifest
            if m is not None:
                self.reporter.durable(m.id, under_way=True)
            return True
        self.reporter.not_durable(f"abandoned on {signal_name(sig)}")
        return False
