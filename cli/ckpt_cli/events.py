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
flushed at once. A file that cannot be written is reported once and then left
alone: the log never stops the run.

Imports: standard library and `console`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from ckpt_cli import console

VERSION = 1

#: Every event and its fields (besides v, ts, time, event, run).
EVENTS: dict[str, tuple[str, ...]] = {
    "start": ("remote", "dir", "command", "host", "pid", "version"),
    "restore": ("snapshot", "generation", "files", "bytes", "seconds"),
    "fresh": ("reason",),
    "launch": ("attempt", "pid"),
    "exit": ("attempt", "status", "description", "seconds"),
    "retry": ("attempt", "retry", "retries", "delay"),
    "snapshot": ("snapshot", "generation", "files", "bytes", "new_bytes", "seconds", "reason"),
    "snapshot_failed": ("error", "retry_in"),
    "remote_recovered": ("down_seconds",),
    "preemption": ("cloud", "action", "deadline", "detail"),
    "stop": ("signal",),
    "give_up": ("status", "reason"),
    "end": ("status", "outcome", "attempts", "snapshots", "bytes_uploaded", "last_snapshot"),
}


class EventLog:
    """The JSON event log of one run (or nothing, with path None)."""

    def __init__(self, path: Path | None, run: str) -> None:
        self.path = path
        self.run = run
        self._lock = threading.Lock()
        self._fd = -1
        self._failed = False
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                self._fail(exc)

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
            **fields,
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
