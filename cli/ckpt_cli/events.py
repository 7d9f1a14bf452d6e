"""`--log-json FILE`: one JSON object per line for each event of a `ckpt run`,
for log shippers (Vector, Fluent Bit, CloudWatch agent, Loki's promtail).

Every object has:
    "v"      schema version, 1 (a field may be added; none is removed or
             renamed without a new version)
    "ts"     seconds since the epoch (float), this machine's clock
    "time"   the same as an RFC 3339 UTC string
    "event"  one of EVENTS below
    "run"    the run's id (CKPT_RUN)
and the event's own fields (see EVENTS). The file is opened for appending, so
several runs can share one; each line is written whole with one write() and
flushed at once. Every string in an event is scrubbed of secrets (`redact`).

The file is created private (0600), and a path ckpt would not create a file
at is bad input (ConfigError, 78, before anything runs): a directory that
does not exist (ckpt creates none for it), a symlink (it is never followed:
in a shared directory another user's link could point anywhere the run may
write; /dev/stdout, /dev/stderr and /dev/fd/N, ckpt's own streams, are the
exceptions), or a file of another user. A file that cannot be written once
the run is under way is reported once and then left alone: the log never
stops the run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any

from ckpt_cli import console
from ckpt_cli.errors import ConfigError
from ckpt_cli.redact import scrub_doc

VERSION = 1

#: Every event and its fields (besides v, ts, time, event, run).
EVENTS: dict[str, tuple[str, ...]] = {
    "start": ("remote", "dir", "command", "host", "pid", "version"),
    "restore": ("snapshot", "generation", "files", "bytes", "seconds"),
    "repair": ("files", "moved_aside", "left", "kept"),
    "rollback": (
        "snapshot",
        "generation",
        "marked",
        "to",
        "to_generation",
        "attempts",
        "statuses",
    ),
    "fresh": ("reason",),
    "launch": ("attempt", "pid"),
    "exit": ("attempt", "status", "description", "seconds"),
    "retry": ("attempt", "retry", "retries", "delay"),
    "snapshot": (
        "snapshot",
        "generation",
        "files",
        "bytes",
        "new_bytes",
        "seconds",
        "reason",
        "verified",
        "unverified",
    ),
    "snapshot_waiting": ("state", "files", "seconds"),
    "snapshot_failed": ("error", "retry_in"),
    "remote_recovered": ("down_seconds",),
    "preemption": ("cloud", "action", "deadline", "detail"),
    "stop": ("signal",),
    "give_up": ("status", "reason"),
    "end": (
        "status",
        "outcome",
        "attempts",
        "snapshots",
        "bytes_uploaded",
        "last_snapshot",
        "failures",
        "lost_seconds",
        "resume_seconds",
    ),
}


#: ckpt's own output streams, named through /dev or /proc: links that are
#: followed (nobody else can plant them).
_OWN_STREAM = re.compile(r"^/(?:dev/(?:stdout|stderr|fd/\d+)|proc/self/fd/\d+)$")


def is_own_stream(path: Path) -> bool:
    return bool(_OWN_STREAM.match(str(path)))


def check_path(path: Path) -> Path:
    """What --log-json accepts, judged before anything runs: its directory
    exists, and it is not a directory or a symlink (but ckpt's own streams).
    ConfigError (one line) if not."""
    if is_own_stream(path):
        return path
    parent = path.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise ConfigError(
            f"--log-json {path}: the directory {parent} {what} (ckpt creates none for it)"
        )
    if path.is_symlink():
        raise ConfigError(
            f"--log-json {path} is a symlink, which ckpt does not follow: give the file itself"
        )
    if path.is_dir():
        raise ConfigError(f"--log-json {path} is a directory: give a file in it")
    return path


def open_log(path: Path) -> int:
    """The file descriptor to append events to: created 0600, never through a
    symlink, and not someone else's file. ConfigError (one line) if not."""
    if is_own_stream(path):
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    else:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    # O_NONBLOCK: opening a FIFO with no reader fails at once instead of hanging.
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(
                f"--log-json {path} is a symlink, which ckpt does not follow: give the file itself"
            ) from None
        if exc.errno == errno.ENXIO:  # a FIFO: O_NONBLOCK refuses to wait for a reader
            raise ConfigError(f"--log-json {path} is a FIFO that nothing reads yet") from None
        raise ConfigError(f"--log-json {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid != os.geteuid():
            raise ConfigError(
                f"--log-json {path} belongs to uid {st.st_uid}, not to you: give a file of your own"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class EventLog:
    """The JSON event log of one run (or nothing, with path None). Opening it
    raises ConfigError for a path ckpt will not write (`open_log`)."""

    def __init__(self, path: Path | None, run: str) -> None:
        self.path = path
        self.run = run
        self._lock = threading.Lock()
        self._fd = -1
        self._failed = False
        if path is not None:
            self._fd = open_log(path)

    def emit(self, event: str, **fields: Any) -> None:
        if self._fd < 0:
            return
        assert event in EVENTS, event
        now = time.time()
        doc = {
            "v": VERSION,
            "ts": round(now, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now % 1 * 1000):03d}Z",
            "event": event,
            "run": self.run,
            **scrub_doc(fields),
        }
        line = (json.dumps(doc, default=str, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd < 0:
                return
            try:
                os.write(self._fd, line)
            except OSError as exc:
                self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        if not self._failed:
            self._failed = True
            console.warn(f"--log-json {self.path}: {exc.strerror or exc}; no more JSON events")
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
