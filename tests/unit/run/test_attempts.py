"""The attempt loop (ckpt_cli.run.attempts) on scripted histories: fake
children that exit when the fake clock says, signals delivered at scripted
times, no process started and no sleeping (honcho's test_manager.py)."""

from __future__ import annotations

import json
import random
import signal
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import pytest

from ckpt_cli.config import RunConfig
from ckpt_cli.errors import CkptError
from ckpt_cli.events import EventLog
from ckpt_cli.policy import Backoff, ChildExit, RetryOn
from ckpt_cli.run.attempts import PREEMPTED, AttemptLoop, State
from ckpt_cli.run.preemption import Notice
from ckpt_cli.run.reporter import Reporter
from ckpt_cli.run.signals import ECHO_WINDOW, NOTICE_WAKE
from ckpt_cli.run.window import NOTICE_RESERVE, NoticeBoard

WALL = 1_700_000_000.0  # the fake wall clock at monotonic 0
FAILED = ChildExit(code=1)
OK = ChildExit(code=0)


class FakeClock:
    """A monotonic clock that moves only when the loop waits or sleeps, and
    the signal source: `at(t, sig)` delivers sig once the clock reaches t."""

    def __init__(self) -> None:
        self.now = 100.0
        self.waits: list[float] = []  # every timeout the loop waited for
        self.script: list[tuple[float, int, Callable[[], None]]] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return WALL + self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def at(self, t: float, sig: int, before: Callable[[], None] = lambda: None) -> None:
        self.script.append((t, sig, before))
        self.script.sort(key=lambda e: e[0])

    def wait(self, timeout: float) -> list[int]:
        self.waits.append(timeout)
        if self.script and self.script[0][0] <= self.now + timeout:
            self.now = max(self.now, self.script[0][0])
            due = [e for e in self.script if e[0] <= self.now]
            self.script = self.script[len(due) :]
            for _, _, before in due:
                before()
            return [sig for _, sig, _ in due]
        self.now += timeout
        return []


class FakeChild:
    """Exits `runs` seconds after its launch with `ends`; a SIGTERM makes it
    exit `term_takes` seconds later (None: it ignores SIGTERM); SIGKILL at once."""

    def __init__(
        self,
        clock: FakeClock,
        pid: int,
        runs: float,
        ends: ChildExit,
        term_takes: float | None,
    ) -> None:
        self.clock = clock
        self.pid = self.pgid = pid
        self.started = clock.now
        self.exit: ChildExit | None = None
        self._end_at = clock.now + runs
        self._ends = ends
        self._term_takes = term_takes
        self.signals: list[int] = []  # to the whole tree
        self.sent: list[int] = []  # to the direct child

    def poll(self) -> ChildExit | None:
        if self.exit is None and self.clock.now >= self._end_at:
            self.exit = self._ends
        return self.exit

    def signal_all(self, sig: int, exclude: Collection[int] = ()) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL:
            self._end_at, self._ends = self.clock.now, ChildExit(signal=signal.SIGKILL)
        elif self._term_takes is not None:
            end_at = self.clock.now + self._term_takes
            if end_at < self._end_at:
                self._end_at, self._ends = end_at, ChildExit(signal=sig)

    def send(self, sig: int) -> None:
        self.sent.append(sig)

    def stop_leftovers(self, grace: float, exclude: Collection[int] = ()) -> int:
        return 0


class Spawner:
    """The process factory: one scripted child per launch, in order."""

    def __init__(self, clock: FakeClock, *script: tuple[float, ChildExit, float | None]) -> None:
        self.clock = clock
        self.script = list(script)
        self.children: list[FakeChild] = []
        self.envs: list[dict[str, str]] = []

    def __call__(self, argv: Sequence[str], env: Mapping[str, str]) -> FakeChild:
        runs, ends, term_takes = self.script.pop(0)
        child = FakeChild(self.clock, 1000 + len(self.children), runs, ends, term_takes)
        self.children.append(child)
        self.envs.append(dict(env))
        return child


class FakeBetween:
    """What happens to --dir between attempts, recorded."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.durable: tuple[str, int | None] | None = None
        self.rolled_back: tuple[str, int | None] | None = None
        self.rolls_back_to: tuple[str, int | None] | None = None  # after a failure

    def last_durable(self) -> tuple[str, int | None] | None:
        return self.durable

    def take_rolled_back(self) -> tuple[str, int | None] | None:
        rolled, self.rolled_back = self.rolled_back, None
        return rolled

    def reprepare(self) -> tuple[str, int | None]:
        self.calls.append("reprepare")
        return "", None

    def watch(self) -> None:
        pass  # the watcher is asked to be alive every second: not recorded

    def repair(self) -> None:
        self.calls.append("repair")

    def failed(
        self, *, attempt: int, started_from: str, launched: float, exited: float, status: str
    ) -> None:
        self.calls.append(f"failed {attempt} from {started_from!r}: {status}")
        self.rolled_back = self.rolls_back_to

    def snapshot_now(self) -> None:
        self.calls.append("snapshot now")

    def restore_if_gone(self) -> str | None:
        return None


class Harness:
    def __init__(self, tmp_path: Path, *children: tuple[float, ChildExit, float | None]) -> None:
        self.clock = FakeClock()
        self.spawn = Spawner(self.clock, *children)
        self.between = FakeBetween()
        self.board = NoticeBoard()
        self.log = tmp_path / "events.jsonl"
        self.checkpoints = 0
        self.checkpoint_error: str | None = None

    def loop(self, **changes: object) -> AttemptLoop:
        fields: dict[str, object] = {
            "command": ["train"],
            "dir": Path("/nonexistent/ckpt-dir"),
            "remote": "/nonexistent/remote",
            "storage_options": {},
            "retries": 3,
            "retry_on": RetryOn(codes=frozenset({1})),
            "backoff": Backoff(initial=4.0, cap=60.0),
            "grace": 30.0,
        }
        fields.update(changes)
        cfg = RunConfig(**fields)  # type: ignore[arg-type]
        reporter = Reporter(EventLog(self.log, "run-1"), run_id="run-1", settle_timeout=1.0)
        return AttemptLoop(
            cfg,
            clock=self.clock,
            spawn=self.spawn,
            signals=self.clock,
            between=self.between,
            reporter=reporter,
            board=self.board,
            checkpoint=self._checkpoint,
            rng=random.Random(7),
            env={"PATH": "/bin"},
        )

    def _checkpoint(self) -> list[int]:
        if self.checkpoint_error is not None:
            raise CkptError(self.checkpoint_error)
        self.checkpoints += 1
        return [1]

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def kinds(self) -> list[str]:
        return [str(e["event"]) for e in self.events()]

    def post_notice(self, seconds_left: float) -> Callable[[], None]:
        def post() -> None:
            self.board.notice = Notice("aws", "terminate", self.clock.time() + seconds_left, "t")

        return post


def test_a_child_that_succeeds_ends_the_run_with_0(tmp_path: Path) -> None:
    h = Harness(tmp_path, (5.0, OK, 1.0))
    loop = h.loop()
    assert loop.run() == 0
    assert loop.states == [State.STARTING, State.RUNNING, State.EXITED]
    assert [a.exit for a in loop.attempts] == [OK]
    assert loop.attempts[0].seconds == pytest.approx(5.0)
    assert h.kinds() == ["launch", "exit"]
    assert h.between.calls == []  # nothing to repair after a success


def test_a_recoverable_failure_backs_off_then_relaunches(tmp_path: Path) -> None:
    h = Harness(tmp_path, (2.0, FAILED, 1.0), (3.0, OK, 1.0))
    loop = h.loop()
    assert loop.run() == 0
    assert loop.states == [
        *(State.STARTING, State.RUNNING, State.BACKOFF),
        *(State.STARTING, State.RUNNING, State.EXITED),
    ]
    retry = [e for e in h.events() if e["event"] == "retry"]
    delay = Backoff(initial=4.0, cap=60.0).delay(1, random.Random(7))
    assert retry == [{**retry[0], "attempt": 1, "retry": 1, "retries": 3, "delay": round(delay, 3)}]
    # The backoff asked the clock for the delay, a second at a time.
    second = h.spawn.children[1]
    assert second.started - 100.0 == pytest.approx(2.0 + delay)
    assert [e["CKPT_ATTEMPT"] for e in h.spawn.envs] == ["1", "2"]
    assert h.between.calls == ["repair", "failed 1 from '': exit code 1"]


def test_the_second_attempt_starts_from_the_newest_durable_snapshot(tmp_path: Path) -> None:
    h = Harness(tmp_path, (1.0, FAILED, 1.0), (1.0, OK, 1.0))
    loop = h.loop()
    loop.restored_id, loop.restored_step = "aaa", 10
    h.between.durable = ("bbb", 20)
    assert loop.run() == 0
    started = [(e["CKPT_RESTORED"], e["CKPT_RESTORED_STEP"]) for e in h.spawn.envs]
    assert started == [("aaa", "10"), ("bbb", "20")]


def test_a_rollback_of_the_crash_loop_guard_is_where_the_next_attempt_starts(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, (1.0, FAILED, 1.0), (1.0, OK, 1.0))
    loop = h.loop()
    h.between.durable = ("bbb", 20)
    h.between.rolls_back_to = ("older", 5)
    assert loop.run() == 0
    assert h.spawn.envs[1]["CKPT_RESTORED"] == "older"
    assert h.spawn.envs[1]["CKPT_RESTORED_STEP"] == "5"


def test_retries_spent_give_up_with_the_childs_status(tmp_path: Path) -> None:
    h = Harness(tmp_path, (1.0, FAILED, 1.0), (1.0, FAILED, 1.0))
    loop = h.loop(retries=1)
    assert loop.run() == 1
    assert loop.state is State.FATAL
    assert loop.states.count(State.BACKOFF) == 1
    assert h.kinds() == ["launch", "exit", "retry", "launch", "exit", "give_up"]
    give_up = h.events()[-1]
    assert give_up["reason"] == "retries spent (--retries)"


def test_a_failure_not_retried_is_passed_on_at_once(tmp_path: Path) -> None:
    h = Harness(tmp_path, (1.0, ChildExit(code=3), 1.0))
    loop = h.loop()
    assert loop.run() == 3
    assert loop.states == [State.STARTING, State.RUNNING, State.FATAL]
    assert h.events()[-1]["reason"] == "not retried (--retry-on)"
    assert len(h.spawn.children) == 1


def test_a_stop_is_forwarded_and_the_run_ends_with_128_plus_it(tmp_path: Path) -> None:
    h = Harness(tmp_path, (60.0, OK, 2.0))
    h.clock.at(110.0, signal.SIGTERM)
    loop = h.loop()
    assert loop.run() == 128 + signal.SIGTERM
    assert loop.states == [State.STARTING, State.RUNNING, State.STOPPING, State.EXITED]
    child = h.spawn.children[0]
    assert child.signals == [signal.SIGTERM]  # no SIGKILL: it exited within its grace
    assert h.clock.now == pytest.approx(112.0)
    assert h.kinds() == ["launch", "stop", "exit"]


def test_a_child_that_ignores_the_stop_is_killed_after_its_grace(tmp_path: Path) -> None:
    h = Harness(tmp_path, (600.0, OK, None))
    h.clock.at(110.0, signal.SIGINT)
    loop = h.loop(grace=7.0)
    assert loop.run() == 128 + signal.SIGINT
    child = h.spawn.children[0]
    assert child.signals == [signal.SIGINT, signal.SIGKILL]
    assert h.clock.now == pytest.approx(117.0)  # woken for the deadline, not a second late
    assert loop.attempts[0].exit == ChildExit(signal=signal.SIGKILL)


def test_the_same_stop_twice_within_the_echo_window_is_one_stop(tmp_path: Path) -> None:
    h = Harness(tmp_path, (600.0, OK, None))
    h.clock.at(110.0, signal.SIGTERM)
    h.clock.at(110.0 + ECHO_WINDOW / 2, signal.SIGTERM)
    loop = h.loop(grace=7.0)
    loop.run()
    assert h.spawn.children[0].signals == [signal.SIGTERM, signal.SIGKILL]
    assert h.clock.now == pytest.approx(117.0)  # the grace ran out: the echo did not hurry


def test_a_second_stop_kills_the_child_at_once(tmp_path: Path) -> None:
    h = Harness(tmp_path, (600.0, OK, None))
    h.clock.at(110.0, signal.SIGTERM)
    h.clock.at(112.0, signal.SIGTERM)
    loop = h.loop(grace=30.0)
    assert loop.run() == 128 + signal.SIGTERM
    assert h.spawn.children[0].signals == [signal.SIGTERM, signal.SIGKILL]
    assert h.clock.now == pytest.approx(112.0)


def test_a_stop_while_backing_off_ends_the_run_without_a_relaunch(tmp_path: Path) -> None:
    h = Harness(tmp_path, (1.0, FAILED, 1.0), (1.0, OK, 1.0))
    h.clock.at(101.5, signal.SIGHUP)
    loop = h.loop()
    assert loop.run() == 128 + signal.SIGHUP
    assert len(h.spawn.children) == 1
    assert loop.states[-2:] == [State.BACKOFF, State.EXITED]
    assert h.kinds() == ["launch", "exit", "retry", "stop"]


def test_the_checkpoint_signal_goes_to_the_handlers_the_others_to_the_child(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, (10.0, OK, 1.0))
    h.clock.at(102.0, signal.SIGUSR1)  # the default --checkpoint-signal
    h.clock.at(103.0, signal.SIGUSR2)
    loop = h.loop()
    assert loop.run() == 0
    assert h.checkpoints == 1
    assert h.spawn.children[0].sent == [signal.SIGUSR2]


def test_a_notice_stops_the_child_so_the_flush_keeps_time(tmp_path: Path) -> None:
    h = Harness(tmp_path, (600.0, OK, 3.0))
    h.clock.at(110.0, NOTICE_WAKE, h.post_notice(120.0))
    loop = h.loop(grace=30.0)
    assert loop.run() == PREEMPTED
    window = h.board.window
    assert window is not None and window.deadline == pytest.approx(230.0)
    # Half the window (60 s, more than NOTICE_RESERVE) is the child's.
    assert window.stop_at == pytest.approx(170.0)
    child = h.spawn.children[0]
    assert child.signals == [signal.SIGTERM]
    assert child.exit == ChildExit(signal=signal.SIGTERM)
    assert h.clock.now == pytest.approx(173.0)
    assert h.checkpoints == 1 and h.between.calls == ["snapshot now", "repair"]
    assert loop.states == [State.STARTING, State.RUNNING, State.STOPPING, State.EXITED]
    assert h.kinds() == ["launch", "preemption", "stop", "exit"]


def test_a_short_notice_cuts_the_grace_to_a_third_of_what_is_left(tmp_path: Path) -> None:
    h = Harness(tmp_path, (600.0, OK, None))
    h.clock.at(110.0, NOTICE_WAKE, h.post_notice(NOTICE_RESERVE + 6.0))
    loop = h.loop(grace=30.0)
    assert loop.run() == PREEMPTED
    # Stopped at 116 (the reserve left), then a third of the 10 s left: SIGKILL
    # at about 119.3, long before --grace's 30 s.
    assert h.spawn.children[0].signals == [signal.SIGTERM, signal.SIGKILL]
    assert h.clock.now == pytest.approx(116.0 + NOTICE_RESERVE / 3)


def test_the_stop_of_the_os_after_the_notice_stop_does_not_hurry(tmp_path: Path) -> None:
    h = Harness(tmp_path, (600.0, OK, None))
    h.clock.at(110.0, NOTICE_WAKE, h.post_notice(120.0))
    h.clock.at(171.0, signal.SIGTERM)  # the OS shutting down, after ckpt's own stop at 170
    loop = h.loop(grace=9.0)
    assert loop.run() == PREEMPTED
    assert h.spawn.children[0].signals == [signal.SIGTERM, signal.SIGKILL]
    assert h.clock.now == pytest.approx(179.0)  # ckpt's grace, not a SIGKILL at 171


def test_a_notice_before_the_launch_launches_nothing(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.post_notice(100.0)()
    loop = h.loop()
    assert loop.run() == PREEMPTED
    assert h.spawn.children == []
    assert loop.states == [State.EXITED]
    assert h.kinds() == ["preemption"]


def test_a_notice_while_backing_off_ends_the_run(tmp_path: Path) -> None:
    h = Harness(tmp_path, (1.0, FAILED, 1.0), (1.0, OK, 1.0))
    h.clock.at(101.5, NOTICE_WAKE, h.post_notice(100.0))
    loop = h.loop()
    assert loop.run() == PREEMPTED
    assert len(h.spawn.children) == 1
    assert h.kinds() == ["launch", "exit", "retry", "preemption"]


def test_a_child_done_on_its_own_under_a_notice_succeeds(tmp_path: Path) -> None:
    h = Harness(tmp_path, (20.0, OK, 1.0))
    h.clock.at(110.0, NOTICE_WAKE, h.post_notice(120.0))
    h.checkpoint_error = "no child handler"
    loop = h.loop()
    assert loop.run() == 0
    assert h.spawn.children[0].signals == []
