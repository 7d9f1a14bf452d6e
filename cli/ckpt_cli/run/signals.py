"""Signals during a run: what a stop signal means (the first, the same one
delivered twice, a second one, the one after ckpt stopped the child for a
notice), the self-pipe the handlers write to, and the checkpoint signal's
routing to the processes of the child that handle it.

Signal handlers only record: every handled signal is written to a self-pipe by
`signal.set_wakeup_fd`, and the loop reads it (`WakePipe.wait`).
"""

from __future__ import annotations

import contextlib
import enum
import os
import select
import signal
import threading
from collections.abc import Callable, Collection
from typing import Any, Protocol

from ckpt_cli import console, processes
from ckpt_cli.errors import CkptError, Stopped
from ckpt_cli.policy import signal_name
from ckpt_cli.run.child import catches_signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: A stop signal this soon after the first is the same stop delivered twice
#: (GNU timeout signals its command and then its own group, ckpt included), not
#: a second one asking to kill at once.
ECHO_WINDOW = 0.5
FORWARD_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
#: Written to the wake pipe by the preemption watcher (no signal is numbered 0).
NOTICE_WAKE = 0


def early_stop_handlers(aborts: Callable[[], bool]) -> dict[int, Any]:
    """Until the child is launched a stop signal aborts what is under way
    (raising Stopped, while `aborts()`). Without a handler, SIGTERM would kill
    ckpt mid-restore and leave its lease held, and PID 1 of a container would
    ignore it: the kernel applies no default action to a namespace's init.
    The old handlers, to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum: int, frame: object) -> None:
        if aborts():
            raise Stopped(signum)

    return {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}


class Stop(enum.Enum):
    """What a stop signal asks for."""

    FIRST = "first"  # stop: forward it, let the child's grace and the flush run
    ECHO = "echo"  # the first stop delivered again within ECHO_WINDOW: nothing
    SECOND = "second"  # hurry: kill the child now, abandon the final flush
    AFTER_NOTICE = "after notice"  # the OS's stop after ckpt's notice stop: nothing more


class StopState:
    """The stop signals received so far, on the caller's clock (pure: no
    signal is sent and nothing printed here)."""

    def __init__(self) -> None:
        self.signal: int | None = None  # the first stop signal
        self.at = 0.0  # when the newest recorded stop came
        self._notice_stop_at: float | None = None  # ckpt stopped the child for a notice

    def receive(self, sig: int, now: float) -> Stop:
        if self._notice_stop_at is not None and self.at == self._notice_stop_at:
            self.signal, self.at = sig, now
            return Stop.AFTER_NOTICE
        if self.signal is None:
            self.signal, self.at = sig, now
            return Stop.FIRST
        return Stop.SECOND if now - self.at >= ECHO_WINDOW else Stop.ECHO

    def stop_for_notice(self, now: float) -> None:
        """ckpt stops the child for a preemption notice, as if the OS had sent
        SIGTERM now (the caller checked that no stop came before)."""
        self.receive(signal.SIGTERM, now)
        self._notice_stop_at = self.at


class WakePipe:
    """The self-pipe the signal handlers (and the preemption watcher) write
    to. A SIGCHLD read from it reaps the orphans re-parented to ckpt, but
    the processes `keep` names."""

    def __init__(self, keep: Callable[[], Collection[int]]) -> None:
        self._keep = keep
        self._r = self._w = -1
        self._lock = threading.Lock()

    def install(self, sigs: Collection[int]) -> dict[int, Any]:
        """Record sigs (and SIGCHLD) through the pipe; the old handlers."""
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._r, self._w = r, w
        old: dict[int, Any] = {}
        for sig in {*sigs, signal.SIGCHLD}:
            old[sig] = signal.signal(sig, _record)
        old[-1] = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        return old

    def restore(self, old: dict[int, Any]) -> None:
        signal.set_wakeup_fd(old.pop(-1))
        for sig, handler in old.items():
            signal.signal(sig, handler)
        with self._lock:
            for fd in (self._r, self._w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._r = self._w = -1

    def notify(self, code: int) -> None:
        """(Any thread.) Wake the loop as if signal `code` had come."""
        # Under the lock: once the loop closed the pipe, its fd number may
        # belong to something else by now.
        with self._lock:
            if self._w >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._w, bytes([code]))

    def wait(self, timeout: float) -> list[int]:
        """Wait up to timeout for signals; return those received. A SIGCHLD is
        not returned: it reaps the orphans re-parented to ckpt."""
        ready, _, _ = select.select([self._r], [], [], timeout)
        if not ready:
            return []
        try:
            data = os.read(self._r, 512)
        except BlockingIOError:
            return []
        if signal.SIGCHLD in data:
            processes.reap(self._keep())  # the child's own status is Child.poll's
        return [s for s in data if s != signal.SIGCHLD]


class Running(Protocol):
    """The child as the checkpoint signal's routing sees it."""

    @property
    def pid(self) -> int: ...
    @property
    def pgid(self) -> int: ...
    def poll(self) -> object: ...


class CheckpointSignal:
    """--checkpoint-signal, sent only to the processes of the child that
    handle it: those that said hello through the shim (several may: one per
    rank of a multi-process job) and the direct child if it catches it."""

    def __init__(self, sig: int, exclude: Collection[int]) -> None:
        self.sig = sig
        self.pids: set[int] = set()
        self._exclude = exclude

    def hello(self, pid: int, signame: str) -> None:
        """A process of the child installed a handler for the signal."""
        self.pids.add(pid)

    def send(self, child: Running | None) -> list[int]:
        """Send the signal to every live process of the child (its group, or
        below ckpt) that registered through the shim, and to the direct child
        if it catches the signal itself (its own handler, a bash trap);
        CkptError if none does: the default action of SIGUSR1 would kill an
        unprepared child."""
        name = signal_name(self.sig)
        if child is None or child.poll() is not None:
            raise CkptError("no child is running")
        targets = set(self.pids)
        if catches_signal(child.pid, self.sig):
            targets.add(child.pid)
        # A registered pid is signalled only while it is the child's: in its
        # group, or below ckpt in a session of its own (torchrun starts every
        # worker so); never a recycled pid of some other process.
        ours = {p.pid for p in processes.live(os.getpid(), pgid=child.pgid, exclude=self._exclude)}
        sent = []
        for pid in sorted(targets & ours):
            try:
                os.kill(pid, self.sig)
                sent.append(pid)
            except ProcessLookupError:
                continue
        if not sent:
            raise CkptError(
                f"the child has not installed a {name} handler (call ckpt.checkpoint() or "
                f"ckpt.on_preemption() in the script); not sent, it would kill the child"
            )
        pids = f"{'pid' if len(sent) == 1 else 'pids'} {', '.join(map(str, sent))}"
        console.info(f"sent {name} to the child ({pids}): checkpoint soon")
        return sent


def _record(signum: int, frame: object) -> None:
    """Signal handler: nothing to do; set_wakeup_fd already recorded signum."""
