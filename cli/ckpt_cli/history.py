"""The run history kept in the repository: one small JSON object per `ckpt run`
under runs/<run-id>.json, with the host, every attempt (its global number, when
it started and ended, how, what it started from), the preemption notice if one
came, and the newest snapshots' capture times: the facts `costs` turns into
the work each failure lost and the time each relaunch took.

It is what makes CKPT_ATTEMPT and `ckpt ls` true across machines: a run on a
replacement VM numbers its first attempt after every attempt recorded before it.
A record is written only by its own run, which holds the lease, and is
rewritten as the run goes on; an attempt is recorded when it starts, so a run
killed -9 mid-attempt still counts it. Writes happen on a background thread and
never hold up the child: the history is a log, not a source of truth for data,
so a remote that does not answer delays it, and a write that fails is retried
with the next change and reported once per streak of failures, whatever
each failure's message (none while `close` waits: its caller says once
whether the record is final). While the run goes on the record is rewritten
at least every ALIVE seconds (`seen`), so a run killed -9 left a bound on when
it died.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ckpt_cli import costs
from ckpt_cli.backends import Backend, NotFound
from ckpt_cli.errors import RemoteError
from ckpt_cli.manifest import Entry, host_name

RUNS = "runs/"
FORMAT = "ckpt-run"
VERSION = 1
_KEY_RE = re.compile(r"^runs/([A-Za-z0-9_.-]{1,100})\.json$")
#: Bytes a run record may have before it is taken for garbage.
MAX_RECORD = 1 << 20
#: Snapshots a record keeps (the newest): enough to draw a run's timeline
#: after retention pruned their manifests, far below MAX_RECORD.
MAX_SNAPSHOTS = 1000
#: Seconds between rewrites of a running record (its `seen`) at most.
ALIVE = 30.0
#: Earlier runs a run reads to know what its failures cost as it goes: the
#: one it may continue, and what that one restored (`ckpt ls` reads all).
EARLIER = 5


def run_key(run_id: str) -> str:
    return f"{RUNS}{run_id}.json"


def parse_record(raw: bytes) -> dict[str, Any] | None:
    """A run record, or None if raw is not one (garbage, foreign, too big)."""
    if len(raw) > MAX_RECORD:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # garbage, or [[[[... deeper than the parser
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        return None
    attempts = doc.get("attempts")
    if not isinstance(attempts, list) or not all(isinstance(a, dict) for a in attempts):
        return None
    if not isinstance(doc.get("run"), str) or not _time(doc.get("started")):
        return None
    if doc.get("ended") is not None and not _time(doc["ended"]):
        return None
    if not isinstance(doc.get("preemption"), dict | None):
        return None
    return doc


#: Latest time a record may carry (year 5138): a larger one, NaN or inf is garbage
#: (and would make `ckpt ls --runs` fail to print it).
_MAX_TIME = 1e11


def _time(value: object) -> bool:
    """A time in epoch seconds that can be printed."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return 0 <= value <= _MAX_TIME


def load_runs(backend: Backend, *, workers: int = 8) -> list[dict[str, Any]]:
    """Every readable run record, oldest start first. Records that vanished
    or do not parse are skipped: the history informs, it never blocks a run.
    RemoteError if the listing itself fails."""
    keys = [k for k in backend.list(RUNS) if _KEY_RE.match(k)]

    def read(key: str) -> dict[str, Any] | None:
        try:
            return parse_record(backend.read(key))
        except (NotFound, RemoteError):
            return None

    if not keys:
        return []
    with concurrent.futures.ThreadPoolExecutor(min(workers, len(keys))) as pool:
        found = [r for r in pool.map(read, keys) if r is not None]
    return sorted(found, key=lambda r: (r["started"], r["run"]))


def changed_at(entries: Iterable[Entry], parent: Sequence[Entry] | None) -> float | None:
    """The newest modification time (epoch seconds) of a file that entries
    hold in a version parent did not (new content); None if there is none."""
    old = {e.path: e.chunks for e in parent or () if e.type == "file"}
    times = [e.mtime_ns for e in entries if e.type == "file" and old.get(e.path) != e.chunks]
    return max(times) / 1e9 if times else None


def annotate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records as the JSON forms show them: every attempt with its
    `outcome`, `lost_seconds` and `resume_seconds` as computed from all the
    records, and the run's `costs` (failures, lost_seconds, resume_seconds)."""
    ledger = costs.Ledger(records)
    out = []
    for rec in records:
        rc = ledger.runs.get(str(rec["run"]))
        if rc is None:
            out.append(rec)
            continue
        raws = [a for a in rec["attempts"] if isinstance(a, dict)]
        attempts = [{**_finite(raw), **fields(a)} for raw, a in zip(raws, rc.attempts, strict=True)]
        out.append({**_finite(rec), "attempts": attempts, "costs": rc.totals()})
    return out


def _finite(doc: Any) -> Any:
    """A copy of doc (JSON values) with NaN and infinities as null: strict
    JSON. Without recursion: a crafted record may nest as deep as the parser
    let it."""
    root: list[Any] = [doc]
    stack: list[tuple[Any, Any]] = [(root, 0)]
    while stack:
        holder, key = stack.pop()
        value = holder[key]
        if isinstance(value, float) and not math.isfinite(value):
            holder[key] = None
        elif isinstance(value, dict):
            holder[key] = mapping = dict(value)
            stack.extend((mapping, k) for k in mapping)
        elif isinstance(value, list):
            holder[key] = items = list(value)
            stack.extend((items, i) for i in range(len(items)))
    return root[0]


def fields(a: costs.AttemptCost) -> dict[str, Any]:
    """An attempt's computed fields, as records and JSON forms carry them."""
    return {
        "outcome": a.outcome,
        "lost_seconds": None if a.lost is None else round(a.lost, 3),
        "resume_seconds": None if a.resume is None else round(a.resume, 3),
    }


def _rank(record: dict[str, Any]) -> int:
    rank = record.get("rank")
    return rank if isinstance(rank, int) and not isinstance(rank, bool) else 0


def attempts_before(runs: list[dict[str, Any]], exclude: str = "", rank: int = 0) -> int:
    """How many attempts the recorded runs (but `exclude`) of this rank made
    (records without a rank are single-node runs: rank 0)."""
    return sum(len(r["attempts"]) for r in runs if r["run"] != exclude and r.get("rank", 0) == rank)


class RunHistory:
    """This run's record, written in the background whenever it changes."""

    RETRY = 5.0

    def __init__(
        self,
        backend: Backend,
        run_id: str,
        *,
        on_error: Any = None,
        rank: int | None = None,
        earlier: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.backend = backend
        self.key = run_key(run_id)
        #: The records of the runs before this one of its rank (`load_runs`),
        #: the newest EARLIER that made attempts: a failed one this run
        #: continues makes its first attempt a relaunch. (`ckpt ls` reads all.)
        lane = [r for r in earlier if _rank(r) == (rank or 0) and r.get("run") != run_id]
        self.earlier = [r for r in lane if r.get("attempts")][-EARLIER:]
        self.record: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "run": run_id,
            "host": host_name(),
            "pid": os.getpid(),
            **({} if rank is None else {"rank": rank}),
            "started": time.time(),
            "seen": time.time(),
            "ended": None,
            "attempts": [],
            "preemption": None,
            "exit_status": None,
            "outcome": None,
            "snapshots": [],
            "snapshots_dropped": 0,
            "costs": None,
        }
        self._on_error = on_error
        self._cond = threading.Condition()
        self._version = 0  # bumped by every change
        self._written = 0  # the version last written
        self._stopping = False
        self._abandon = False  # close() stopped waiting: write nothing more
        self._failing = ""  # the last write's error while writes fail, else ""
        self._reported = False  # this streak of failures was reported
        self._thread = threading.Thread(target=self._run, name="ckpt-history", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._changed()

    # -- changes (any thread)

    def attempt_started(self, number: int, resumed: str = "") -> None:
        """resumed: the snapshot the child is told it starts from (CKPT_RESTORED)."""
        with self._cond:
            self.record["attempts"].append(
                {
                    "number": number,
                    "started": time.time(),
                    "seconds": None,
                    "exit": None,
                    "resumed": resumed,
                }
            )
            self._cost()
        self._changed()

    def attempt_ended(
        self,
        number: int,
        status: int,
        describe: str,
        seconds: float,
        *,
        ended: float | None = None,
        outcome: str | None = None,
    ) -> None:
        """ended: when the child's exit was seen (epoch seconds); outcome: one
        of costs.OUTCOMES (costs.attempt_outcome)."""
        with self._cond:
            for a in self.record["attempts"]:
                if a["number"] == number:
                    a.update(seconds=round(seconds, 3), exit=describe, status=status)
                    a.update(ended=time.time() if ended is None else ended, outcome=outcome)
            self._cost()
        self._changed()

    def snapshot_taken(
        self, snapshot: str, attempt: int, captured: float, changed: float | None
    ) -> None:
        """A snapshot is durable: captured when ckpt began reading the
        directory for it; changed, the newest modification of a file it
        holds in a new version (`changed_at`). The newest MAX_SNAPSHOTS stay."""
        with self._cond:
            snaps = self.record["snapshots"]
            snaps.append(
                {
                    "id": snapshot,
                    "attempt": attempt,
                    "captured": round(captured, 3),
                    "changed": None if changed is None else round(changed, 3),
                }
            )
            if len(snaps) > MAX_SNAPSHOTS:
                self.record["snapshots_dropped"] += len(snaps) - MAX_SNAPSHOTS
                del snaps[: len(snaps) - MAX_SNAPSHOTS]
        self._changed()

    def costs(self) -> dict[str, Any]:
        """This run's totals (costs.RunCosts.totals) as of now."""
        with self._cond:
            self._cost()
            return dict(self.record["costs"])

    def _cost(self) -> None:
        """Recompute the lost work and times to resume into the record (with
        the lock held): what this run knows now; a later run may know more
        (what it restored), and `ckpt ls` recomputes from every record."""
        ledger = costs.Ledger([*self.earlier, self.record])
        mine = ledger.runs[self.record["run"]]
        for raw, a in zip(self.record["attempts"], mine.attempts, strict=True):
            raw.update(lost_seconds=fields(a)["lost_seconds"])
            raw.update(resume_seconds=fields(a)["resume_seconds"])
        self.record["costs"] = mine.totals()

    def preempted(self, notice: dict[str, Any]) -> None:
        with self._cond:
            self.record["preemption"] = {**notice, "received": time.time()}
        self._changed()

    def rolled_back(self, rollback: dict[str, Any]) -> None:
        """The crash-loop guard rolled back (from, to, attempts)."""
        with self._cond:
            self.record.setdefault("rollbacks", []).append({**rollback, "time": time.time()})
        self._changed()

    def finish(self, status: int, outcome: str) -> None:
        with self._cond:
            self.record.update(ended=time.time(), exit_status=status, outcome=outcome)
            self._cost()
        self._changed()

    def _changed(self) -> None:
        with self._cond:
            self._version += 1
            self._cond.notify_all()

    # -- the writer

    @property
    def failure(self) -> str:
        """Why the last write failed ("" if it did not)."""
        return self._failing

    @property
    def failure_reported(self) -> bool:
        """The current streak of failed writes was reported (on_error)."""
        return self._reported and bool(self._failing)

    def close(self, timeout: float) -> bool:
        """Write the last change (waiting up to timeout) and stop; True if the
        record in the remote is the final one."""
        end = time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            while self._written < self._version and self._thread.is_alive():
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._abandon = True
            self._cond.notify_all()
            return self._written >= self._version

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._written >= self._version and not self._stopping:
                    if not self._cond.wait(ALIVE) and not self._stopping:
                        self._version += 1  # nothing changed for a while: say it lives
                if self._written >= self._version or self._abandon:
                    return
                version = self._version
                self.record["seen"] = round(time.time(), 3)
                data = json.dumps(self.record, indent=1, sort_keys=True).encode()
            try:
                self.backend.write(self.key, data)
            except (RemoteError, OSError) as exc:
                message = str(exc)
                with self._cond:
                    report = not self._reported and not self._stopping
                if report and self._on_error is not None:
                    self._on_error(f"run history {self.key} not written: {message}")
                    self._reported = True
                self._failing = message
                with self._cond:
                    # Until close() gives up, try again (sooner once it waits).
                    self._cond.wait(0.5 if self._stopping else self.RETRY)
                continue
            self._failing, self._reported = "", False
            with self._cond:
                self._written = max(self._written, version)
                self._cond.notify_all()
