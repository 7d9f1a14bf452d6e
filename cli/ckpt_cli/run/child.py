"""The child process: its own session and process group, signals to the whole
group, and a guardian that kills the group if the supervisor dies (even by
SIGKILL, when no handler of ours can run).

The guardian is a tiny /bin/sh process in its own session reading a pipe from
the supervisor: a line "PGID" names the group to protect, "0" clears it. When
the pipe reaches end of file (the supervisor is gone, however it died), the
guardian sends SIGKILL to the group it holds. PR_SET_PDEATHSIG would only
cover the direct child, not what it spawned. Processes that left the group
(setsid) are reached through `processes` while ckpt lives.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from ckpt_cli import processes
from ckpt_cli.errors import ConfigError
from ckpt_cli.policy import ChildExit

_GUARDIAN = (
    "trap '' INT HUP TERM QUIT TSTP; pg=0; "
    "while IFS= read -r line; do pg=$line; done; "
    'if [ "$pg" != 0 ]; then kill -s KILL -- "-$pg" 2>/dev/null; fi'
)


class Guardian:
    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            ["/bin/sh", "-c", _GUARDIAN],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        self.pid = self._proc.pid

    def protect(self, pgid: int) -> None:
        stdin = self._proc.stdin
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.write(f"{pgid}\n".encode())
                stdin.flush()

    def close(self) -> None:
        """Normal shutdown: the group is already gone; stop the guardian."""
        self.protect(0)
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)


def signal_group(pgid: int, sig: int) -> None:
    """Send sig to every process of the group; a gone group is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Child:
    """One launch of the user's command."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        try:
            self._proc = subprocess.Popen(
                list(argv), env=dict(env), start_new_session=True, close_fds=True
            )
        except FileNotFoundError:
            raise ConfigError(f"command not found: {argv[0]!r} (the command after --)") from None
        except PermissionError:
            raise ConfigError(f"command is not executable: {argv[0]!r}") from None
        self.pid = self._proc.pid
        self.pgid = self.pid  # setsid: the child leads its own session and group
        self.started = time.monotonic()
        self.exit: ChildExit | None = None

    def poll(self) -> ChildExit | None:
        """Reap the child if it has exited (non-blocking)."""
        if self.exit is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.exit
            if pid == self.pid:
                self.exit = ChildExit.from_wait_status(status)
                self._proc.returncode = self.exit.status  # keep Popen from waiting again
        return self.exit

    def signal_all(self, sig: int, exclude: Collection[int] = ()) -> None:
        """sig to the child's group and to every other live process below ckpt
        (a daemon that left the group), but those in exclude and below them."""
        signal_group(self.pgid, sig)
        me = os.getpid()
        processes.send((p for p in processes.live(me, exclude=exclude) if p.pgid != self.pgid), sig)

    def send(self, sig: int) -> None:
        """sig to the direct child only (like tini without -g); a gone child
        is not an error."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def stop_leftovers(self, grace: float, exclude: Collection[int] = ()) -> int:
        """After the child exited: SIGTERM to what is left of its group and of
        ckpt's subtree, SIGKILL after `grace`, then wait until every one is
        gone, reaping the orphans re-parented to ckpt. Returns how many were left."""
        left = self._leftovers(exclude)
        count = len(left)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if not left:
                break
            signal_group(self.pgid, sig)
            processes.send(left, sig)
            deadline = time.monotonic() + wait
            while (left := self._leftovers(exclude)) and time.monotonic() < deadline:
                time.sleep(0.05)
        return count

    def _leftovers(self, exclude: Collection[int]) -> list[processes.Proc]:
        processes.reap(exclude)
        if processes.HAVE_PROC:
            return processes.live(os.getpid(), pgid=self.pgid, exclude=exclude)
        alive = group_alive(self.pgid)  # no /proc: the group is all we can see
        return [processes.Proc(self.pgid, os.getpid(), self.pgid, "S")] if alive else []


def catches_signal(pid: int, sig: int) -> bool:
    """True if the process has a handler for sig (Linux: SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def ckpt_executable() -> str:
    """The `ckpt` command that runs this supervisor, for shell scripts ($CKPT_BIN)."""
    beside = Path(sys.executable).parent / "ckpt"
    argv0 = Path(sys.argv[0])
    if argv0.name == "ckpt" and os.access(argv0, os.X_OK):
        return str(argv0.absolute())
    if beside.exists():
        return str(beside)
    return shutil.which("ckpt") or "ckpt"
