"""The live status of a run: what `ckpt status` shows (through the control
socket) and what the terminal's title says while ckpt runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ckpt_cli import console
from ckpt_cli.worker import SnapshotWorker


def status(
    worker: SnapshotWorker,
    *,
    rate: float,
    settle_timeout: float,
    run: str,
    attempt: int,
    child_pid: int | None,
    dir: str,
    remote: str,
    notice: str | None,
) -> dict[str, Any]:
    """The status document; rate: bytes/s of the last snapshot that uploaded
    anything (shown while no snapshot is under way)."""
    stats = worker.stats
    last = stats.last_durable
    return {
        "run": run,
        "attempt": attempt,
        "child_pid": child_pid,
        "dir": dir,
        "remote": remote,
        "last_snapshot": last.id if last else None,
        "last_snapshot_age": (time.time() - last.created) if last else None,
        "snapshots": stats.snapshots,
        "bytes_uploaded": stats.bytes_uploaded,
        "pending": worker.busy,
        **_backlog(worker, rate),
        "last_error": stats.last_error,
        "preemption": notice,
        **_waiting(worker, settle_timeout),
    }


def _waiting(worker: SnapshotWorker, settle_timeout: float) -> dict[str, Any]:
    """What a snapshot held back for a few seconds waits for."""
    waiting = worker.waiting
    if waiting is None:
        return {"waiting_for": None, "waiting_seconds": None}
    seconds, files = waiting
    return {
        "waiting_for": [{"path": p, "reason": r} for p, r in sorted(files.items())],
        "waiting_seconds": round(seconds, 1),
        "settle_timeout": settle_timeout,
    }


def _backlog(worker: SnapshotWorker, rate: float) -> dict[str, Any]:
    """What the snapshot under way still has to read and upload, and how
    fast it goes (else the last snapshot's rate)."""
    live = worker.snapshotter.live
    if live is None:
        return {"backlog_files": 0, "backlog_bytes": 0, "rate": rate}
    result, files, total, started = live
    elapsed = time.monotonic() - started
    return {
        "backlog_files": max(0, files - result.files_read),
        "backlog_bytes": max(0, total - result.bytes_read),
        "rate": result.bytes_read / elapsed if elapsed > 0.5 else rate,
    }


def title(st: dict[str, Any]) -> str:
    """The terminal's title for a status document."""
    age = st["last_snapshot_age"]
    parts = [f"ckpt: attempt {st['attempt']}"]
    parts.append(f"saved {console.fmt_age(age)} ago" if age is not None else "nothing saved yet")
    if st["backlog_bytes"]:
        parts.append(
            f"uploading {console.fmt_bytes(st['backlog_bytes'])} "
            f"at {console.fmt_bytes(st['rate'])}/s"
        )
    if st["waiting_for"]:
        names = [f["path"] for f in st["waiting_for"]]
        shown = ", ".join(names[:2]) + (" ..." if len(names) > 2 else "")
        parts.append(f"waiting for {shown} ({console.fmt_age(st['waiting_seconds'])})")
    if st["last_error"]:
        parts.append("remote failing")
    if st["preemption"] is not None:
        parts.append("PREEMPTED")
    return " · ".join(parts)


def title_loop(status: Callable[[], dict[str, Any]], stop: threading.Event) -> None:
    """The live status, in the terminal's title (see console), every second."""
    while not stop.wait(1.0):
        console.title(title(status()))
