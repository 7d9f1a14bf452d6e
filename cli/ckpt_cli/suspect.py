"""Suspect marks, the crash-loop guard's: suspect/<snapshot key> holds why,
when and where a snapshot was marked; the snapshot itself is untouched. A
restore tries a suspect snapshot last (`retention.restore_tier`).

"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Collection, Iterable

from ckpt_cli.backends import Backend, NotFound
from ckpt_cli.manifest import host_name
from ckpt_cli.snapshots import SnapshotRef, snapshot_ref

SUSPECT = "suspect/"
SUSPECT_FORMAT = "ckpt-suspect"
#: Bytes a mark may have before it is taken for garbage.
MAX_MARK = 64 * 1024


def suspect_key(snapshot_key: str) -> str:
    """Where the mark of the snapshot at `snapshot_key` lives."""
    return f"{SUSPECT}{snapshot_key}"


@dataclasses.dataclass(frozen=True)
class Suspect:
    """A crash-loop mark: why, when and where it was set."""

    key: str  # the snapshot's key
    why: str
    time: float | None = None
    host: str = ""
    run: str = ""

    def to_json(self) -> dict[str, object]:
        return {"why": self.why, "time": self.time, "host": self.host, "run": self.run}


def parse_suspect(snapshot_key: str, raw: bytes) -> Suspect:
    """A mark as written by mark_suspect; one that does not parse still
    marks its snapshot (its object's name says which)."""
    unreadable = Suspect(snapshot_key, "marked suspect (its mark does not parse)")
    if len(raw) > MAX_MARK:
        return unreadable
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return unreadable
    if not isinstance(doc, dict) or doc.get("format") != SUSPECT_FORMAT:
        return unreadable
    when = doc.get("time")
    if isinstance(when, bool) or not isinstance(when, int | float) or not 0 <= when <= 1e11:
        when = None
    return Suspect(
        snapshot_key,
        str(doc.get("why", ""))[:500] or "marked suspect",
        None if when is None else float(when),
        str(doc.get("host", ""))[:255],
        str(doc.get("run", ""))[:100],
    )


class SuspectMarks:
    """The marks of one repository: listed once, then known; those this
    process marked count even where writing the mark failed."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        #: Snapshot keys marked suspect, as last listed (None: not yet), and
        #: those this process marked (counted even if writing the mark failed).
        self._suspect: set[str] | None = None
        self._marked: set[str] = set()

    def keys(self, *, cached: bool = False) -> set[str]:
        """The keys of every snapshot marked suspect (any stream), by one
        listing of suspect/; cached: the last listing if there was one (the
        snapshot thread's retention: marks are only ever set by the writer)."""
        with self._lock:
            if cached and self._suspect is not None:
                return self._suspect | self._marked
        found = set()
        for key in self.backend.list(SUSPECT):
            snapshot_key = key[len(SUSPECT) :]
            if snapshot_ref(snapshot_key) is not None:
                found.add(snapshot_key)
        with self._lock:
            self._suspect = found
            return found | self._marked

    def read(self, snapshot_key: str) -> Suspect | None:
        """The mark of a snapshot, None if it has none."""
        try:
            raw = self.backend.read(suspect_key(snapshot_key))
        except NotFound:
            with self._lock:
                marked = snapshot_key in self._marked
            return Suspect(snapshot_key, "marked suspect by this run") if marked else None
        return parse_suspect(snapshot_key, raw)

    def mark(self, ref: SnapshotRef, why: str, **details: object) -> None:
        """Mark a snapshot suspect (a small object; the snapshot is untouched).
        It counts as suspect in this process even if the write fails
        (RemoteError is raised then)."""
        with self._lock:
            self._marked.add(ref.key)
        doc = {
            "format": SUSPECT_FORMAT,
            "version": 1,
            "snapshot": ref.id,
            "generation": ref.generation,
            "stream": ref.stream,
            "why": why,
            "time": time.time(),
            "host": host_name(),
            **details,
        }
        self.backend.write(suspect_key(ref.key), json.dumps(doc, indent=1).encode())

    def clear(self, ref: SnapshotRef) -> bool:
        """Remove a snapshot's mark; False if it had none."""
        key = suspect_key(ref.key)
        try:
            self.backend.read(key)
        except NotFound:
            return False
        self.backend.delete(key)
        with self._lock:
            self._marked.discard(ref.key)
            if self._suspect is not None:
                self._suspect.discard(ref.key)
        return True

    def drop(self, dropped: Iterable[SnapshotRef], suspect: Collection[str]) -> None:
        """Retention dropped these snapshots: their marks go too."""
        for ref in dropped:
            if ref.key in suspect:
                self.backend.delete(suspect_key(ref.key))
                with self._lock:
                    self._marked.discard(ref.key)
                    if self._suspect is not None:
                        self._suspect.discard(ref.key)
