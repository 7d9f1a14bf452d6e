"""The attempt loop: launch the command, wait for it while acting on signals
and a preemption notice, decide (success, retry, give up), back off, launch
again. Its states are supervisord's (STARTING, RUNNING, STOPPING, BACKOFF,
EXITED, FATAL).

Everything it acts through is handed in: the clock, the process factory,
the signal source, what happens to --dir between attempts (`Between`), so
that unit tests run it on scripted histories and a fake clock.
"""

from __future__ import annotations

import enum
import random
import shlex
import signal
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

from ckpt import _contract as contract
from ckpt_cli.config import RunConfig
from ckpt_cli.costs import attempt_outcome
from ckpt_cli.errors import CkptError
from ckpt_cli.policy import ChildExit, Decision, decide, signal_name
from ckpt_cli.run.child import ckpt_executable
from ckpt_cli.run.clock import Clock
from ckpt_cli.run.reporter import Attempt, Reporter
from ckpt_cli.run.signals import FORWARD_SIGNALS, NOTICE_WAKE, STOP_SIGNALS, Stop, StopState
from ckpt_cli.run.window import NoticeBoard, PreemptionWindow

PREEMPTED = int(contract.ExitCode.PREEMPTED)


class State(enum.Enum):
    STARTING = "starting"  # an attempt is being launched
    RUNNING = "running"  # the child runs
    STOPPING = "stopping"  # a stop was forwarded (or the notice's own): grace, then SIGKILL
    BACKOFF = "backoff"  # a failed attempt is retried after a delay
    EXITED = "exited"  # the run ends: succeeded, stopped, preempted
    FATAL = "fatal"  # the run ends on a failure not retried (or retries spent)


class Process(Protocol):
    """One launch of the command (`child.Child`)."""

    @property
    def pid(self) -> int: ...
    @property
    def pgid(self) -> int: ...
    @property
    def started(self) -> float: ...
    @property
    def exit(self) -> ChildExit | None: ...
    def poll(self) -> ChildExit | None: ...
    def signal_all(self, sig: int, exclude: Collection[int] = ()) -> None: ...
    def send(self, sig: int) -> None: ...
    def stop_leftovers(self, grace: float, exclude: Collection[int] = ()) -> int: ...


Spawn = Callable[[Sequence[str], Mapping[str, str]], Process]


class Signals(Protocol):
    def wait(self, timeout: float) -> list[int]:
        """Signals received within timeout (NOTICE_WAKE: a notice was posted)."""
        ...


class Between(Protocol):
    """What happens to --dir and its snapshots around attempts (recovery.Recovery)."""

    def last_durable(self) -> tuple[str, int | None] | None: ...
    def take_rolled_back(self) -> tuple[str, int | None] | None: ...
    def reprepare(self) -> tuple[str, int | None]: ...
    def watch(self) -> None: ...
    def repair(self) -> None: ...
    def failed(
        self, *, attempt: int, started_from: str, launched: float, exited: float, status: str
    ) -> None: ...
    def snapshot_now(self) -> None: ...
    def restore_if_gone(self) -> str | None: ...


class AttemptLoop:
    def __init__(
        self,
        cfg: RunConfig,
        *,
        clock: Clock,
        spawn: Spawn,
        signals: Signals,
        between: Between,
        reporter: Reporter,
        board: NoticeBoard,
        checkpoint: Callable[[], object],
        protect: Callable[[int], None] = lambda _pgid: None,
        exclude: Collection[int] = (),
        rng: random.Random | None = None,
        env: Mapping[str, str],
        on_launch: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.spawn = spawn
        self.signals = signals
        self.between = between
        self.reporter = reporter
        self.board = board
        self.checkpoint = checkpoint  # send --checkpoint-signal (CkptError: not sent)
        self.protect = protect  # the guardian's group to kill if ckpt dies (0: none)
        self.exclude = exclude  # ckpt's own helpers below it
        self.rng = rng or random.Random()
        self.env = env  # the child's environment but the CKPT_* of an attempt
        self.on_launch = on_launch  # before each launch
        self.stops = StopState()
        self.state = State.STARTING
        self.states: list[State] = []  # every state entered, in order
        self.attempt = 0  # CKPT_ATTEMPT: counts the attempts of earlier runs too
        self.attempts: list[Attempt] = []
        self.child: Process | None = None
        self.restored_id = ""
        self.restored_step: int | None = None
        #: What a kept --dir (newer than the newest snapshot) descends from.
        self.descends_from: tuple[str, int | None] = ("", None)
        self._kill_at: float | None = None

    # ------------------------------------------------------------ the loop

    def run(self) -> int:
        """Attempts until one ends the run: the loop's exit status."""
        cfg = self.cfg
        retries_used = 0
        while True:
            if self.board.notice is not None:  # came before or between attempts: no new one
                self._note_notice(" between attempts" if self.attempts else " before the launch")
                return self._end(State.EXITED, PREEMPTED)
            ex, started_from, launched, exited = self._attempt()
            status = self._ended_by(ex)
            if status is not None:
                return self._end(State.EXITED, status)
            decision = decide(ex, retries_used, cfg.retries, cfg.retry_on)
            if decision is Decision.SUCCESS:
                return self._end(State.EXITED, 0)
            if decision is not Decision.RETRY:
                self.reporter.give_up(ex, decision, cfg.retries)
                return self._end(State.FATAL, ex.status)
            retries_used += 1
            self.between.failed(
                attempt=self.attempt,
                started_from=started_from,
                launched=launched,
                exited=exited,
                status=ex.describe(),
            )
            delay = cfg.backoff.delay(retries_used, self.rng)
            self.reporter.retry(ex, self.attempt, retries_used, cfg.retries, delay)
            self._enter(State.BACKOFF)
            if self._back_off(delay):
                if self._preempted():
                    return self._end(State.EXITED, PREEMPTED)
                return self._end(State.EXITED, 128 + (self.stops.signal or signal.SIGTERM))
            restored = self.between.restore_if_gone()
            if restored is not None:
                self.restored_id = restored

    def _preempted(self) -> bool:
        """A notice came (the watcher thread posts it at any time)."""
        return self.board.notice is not None

    def _enter(self, state: State) -> None:
        self.state = state
        self.states.append(state)

    def _end(self, state: State, status: int) -> int:
        self._enter(state)
        return status

    def _ended_by(self, ex: ChildExit) -> int | None:
        """The status when the attempt's end ends the run whatever it was."""
        if self.board.notice is not None:
            # The machine is going away: no relaunch here, and no retry spent.
            # Done on its own (not stopped by us or the OS): done.
            done = ex.status == 0 and self.stops.signal is None
            return 0 if done else PREEMPTED
        if self.stops.signal is not None:
            return 128 + self.stops.signal
        return None

    def _attempt(self) -> tuple[ChildExit, str, float, float]:
        """Launch one attempt and wait for its end: its exit, the snapshot it
        started from, when it was launched and when it exited (epoch)."""
        self._enter(State.STARTING)
        self.attempt += 1
        restored, step = self._starts_from()
        env = self._env(restored, step)
        self.reporter.child_env(env)
        self.on_launch()
        self.reporter.attempt_starting(self.attempt, restored)
        launched = self.clock.time()
        child = self.spawn(self.cfg.command, env)
        self.child = child
        self.protect(child.pgid)
        self.reporter.launched(self.attempt, shlex.join(self.cfg.command), child.pid)
        self._enter(State.RUNNING)
        self._kill_at = None
        ex = self._wait(child)
        exited = self.clock.time()
        self.reporter.leftovers(child.stop_leftovers(min(self.cfg.grace, 10.0), self.exclude))
        self.protect(0)
        if ex.status != 0:
            self.between.repair()
        attempt = Attempt(self.attempt, ex, self.clock.monotonic() - child.started)
        self.attempts.append(attempt)
        outcome = attempt_outcome(
            ex.status,
            preempted=self.board.notice is not None,
            stopped=self.stops.signal is not None,
        )
        self.reporter.attempt_ended(attempt, exited, outcome)
        return ex, restored, launched, exited

    def _starts_from(self) -> tuple[str, int | None]:
        """The snapshot this attempt starts from (CKPT_RESTORED), and its step."""
        restored, step = self.restored_id, self.restored_step
        if not restored:
            restored, step = self.descends_from
        durable = self.between.last_durable()
        if durable and self.attempts:
            restored, step = durable
        rolled = self.between.take_rolled_back()  # the crash-loop guard restored this one
        if rolled is not None:
            restored, step = rolled
        if self.attempts and self.cfg.world_size > 1:
            held, held_step = self.between.reprepare()
            if held:  # "" : the dir was kept as the attempt left it (auto mode)
                restored, step = held, held_step
        return restored, step

    def _env(self, restored: str, step: int | None) -> dict[str, str]:
        cfg = self.cfg
        env = dict(self.env)
        env.update(
            {
                contract.ENV_DIR: str(cfg.dir),
                contract.ENV_ATTEMPT: str(self.attempt),
                contract.ENV_RESTORED: restored,
                contract.ENV_RANK: str(cfg.rank),
                contract.ENV_WORLD_SIZE: str(cfg.world_size),
                contract.ENV_RESTORED_STEP: "" if step is None else str(step),
                contract.ENV_CHECKPOINT_SIGNAL: signal_name(cfg.checkpoint_signal),
                contract.ENV_BIN: ckpt_executable(),
            }
        )
        return env

    # ------------------------------------------------------------ one attempt

    def _wait(self, child: Process) -> ChildExit:
        """Wait for the child's exit, acting on signals and a notice."""
        if self.board.notice is not None and self.board.window is None:
            self._take_notice()  # it came before this attempt started
        while True:
            ex = child.poll()
            if ex is not None:
                return ex
            self.between.watch()
            now = self.clock.monotonic()
            wake_at = [now + 1.0]
            if self._kill_at is not None:
                wake_at.append(self._kill_at)
            window = self.board.window
            if window is not None and self.stops.signal is None:
                wake_at.append(window.stop_at)
            for sig in self.signals.wait(max(0.0, min(wake_at) - now)):
                self._on_signal(sig, child)
            self._stop_for_notice(child)
            self._kill_if_due(child)

    def _kill_if_due(self, child: Process) -> None:
        """SIGKILL once a stop's grace (--grace) ran out."""
        kill_at = self._kill_at
        if kill_at is not None and self.clock.monotonic() >= kill_at and child.poll() is None:
            self.reporter.grace_over(self.stops.signal)
            child.signal_all(signal.SIGKILL, self.exclude)
            self._kill_at = None

    def _on_signal(self, sig: int, child: Process) -> None:
        if sig == NOTICE_WAKE:
            self._take_notice()
            if self._kill_at is not None:  # a stop came first: its grace, capped
                self._kill_at = min(self._kill_at, self.clock.monotonic() + self._grace())
        elif sig in STOP_SIGNALS:
            self._on_stop(sig, child)
        elif sig == self.cfg.checkpoint_signal:
            # Only to the processes that handle it: its default action kills.
            try:
                self.checkpoint()
            except CkptError as exc:
                self.reporter.not_passed_on(sig, exc)
        elif sig in FORWARD_SIGNALS:
            child.send(sig)  # the direct child, like tini without -g

    def _on_stop(self, sig: int, child: Process) -> None:
        kind = self.stops.receive(sig, self.clock.monotonic())
        if kind is Stop.AFTER_NOTICE:
            self.reporter.after_notice_stop(sig, "the child is already being stopped")
        elif kind is Stop.FIRST:
            self.reporter.stop(sig)
            self._enter(State.STOPPING)
            child.signal_all(sig, self.exclude)
            grace = self._grace()
            self._kill_at = self.clock.monotonic() + grace
            self.reporter.forwarded(sig, grace)
        elif kind is Stop.SECOND:
            self.reporter.killing_now(sig)
            child.signal_all(signal.SIGKILL, self.exclude)
            self._kill_at = None

    def _stop_for_notice(self, child: Process) -> None:
        """The notice's own stop, once its time came, as if the OS had sent
        SIGTERM now."""
        window = self.board.window
        if window is None or self.stops.signal is not None:
            return
        if self.clock.monotonic() < window.stop_at or child.poll() is not None:
            return
        self.stops.stop_for_notice(self.clock.monotonic())
        self.reporter.stop(signal.SIGTERM)
        self._enter(State.STOPPING)
        child.signal_all(signal.SIGTERM, self.exclude)
        grace = self._grace()
        self._kill_at = self.clock.monotonic() + grace
        self.reporter.notice_stop(grace)

    # ------------------------------------------------------------ preemption

    def _take_notice(self) -> None:
        """The machine is going away: tell the child to checkpoint, snapshot
        now, and plan the child's stop so the final flush ends in time."""
        window = self._note_notice()
        if window is None:
            return
        try:
            self.checkpoint()
        except CkptError as exc:
            self.reporter.no_checkpoint(exc)
        self.between.snapshot_now()
        stop_in = window.stop_at - window.taken_at
        if self.stops.signal is None and stop_in >= 1:
            self.reporter.stop_planned(stop_in)

    def _note_notice(self, context: str = "") -> PreemptionWindow | None:
        """Take in a notice the watcher posted (once): its window on our
        clock, a line, the run history. None if there is no new notice."""
        window = self.board.take(self.clock.monotonic(), self.clock.time())
        if window is not None:
            assert self.board.notice is not None
            self.reporter.notice(self.board.notice, context)
        return window

    def _grace(self) -> float:
        """--grace, cut short during a notice window so the flush keeps time."""
        window = self.board.window
        if window is None:
            return self.cfg.grace
        return window.grace(self.cfg.grace, self.clock.monotonic())

    def _back_off(self, seconds: float) -> bool:
        """Back off; True if a stop signal (or a notice) arrived meanwhile."""
        end = self.clock.monotonic() + seconds
        while (left := end - self.clock.monotonic()) > 0:
            for sig in self.signals.wait(min(left, 1.0)):
                if sig == NOTICE_WAKE and self._note_notice(" while backing off") is not None:
                    return True
                if sig in STOP_SIGNALS:
                    if self.stops.receive(sig, self.clock.monotonic()) is Stop.FIRST:
                        self.reporter.stop(sig)
                    self.reporter.stopped_backing_off(sig)
                    return True
        return False
