"""Snapshot names: which snapshots a repository holds, by listing alone
(loading a manifest is another matter: `repository`). The root stream is a
single-node run's; ranks/<r>/ holds rank r's stream in a run of several.

"""

from __future__ import annotations

import dataclasses
import re

from ckpt_cli.backends import Backend
from ckpt_cli.manifest import SNAPSHOT_RE, SNAPSHOTS

RANKS = "ranks/"
STREAM_RE = re.compile(r"^ranks/(\d+)/")


def rank_stream(rank: int, world_size: int) -> str:
    """Where a rank's snapshots and lease live: the root for one node (the
    layout of single-node runs never changes), ranks/<r>/ in a world of several."""
    return "" if world_size == 1 else f"{RANKS}{rank}/"


def stream_rank(stream: str) -> int:
    m = STREAM_RE.match(stream)
    return int(m.group(1)) if m else 0


def snapshot_ref(key: str) -> SnapshotRef | None:
    """The snapshot a key names (in the root stream or a rank's), else None."""
    m = STREAM_RE.match(key)
    stream = m.group(0) if m else ""
    sm = SNAPSHOT_RE.match(key[len(stream) :])
    return SnapshotRef(int(sm.group(1)), sm.group(2), key, stream) if sm else None


@dataclasses.dataclass(frozen=True)
class SnapshotRef:
    """A snapshot known by its name only (listing is cheap; loading is not)."""

    generation: int
    id: str
    key: str
    #: "" (the root stream) or "ranks/<r>/".
    stream: str = ""


class SnapshotList:
    """The snapshot names in one repository, by listing (never cached)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def snapshots(self, stream: str) -> list[SnapshotRef]:
        """Every snapshot name of `stream`, newest (highest generation) first."""
        refs = []
        for key in self.backend.list(stream + SNAPSHOTS):
            m = SNAPSHOT_RE.match(key[len(stream) :])
            if m and key.startswith(stream):
                refs.append(SnapshotRef(int(m.group(1)), m.group(2), key, stream))
        refs.sort(key=lambda r: (r.generation, r.id), reverse=True)
        return refs

    def rank_snapshots(self) -> dict[int, list[SnapshotRef]]:
        """Every rank's stream under ranks/ (one listing), newest first each."""
        out: dict[int, list[SnapshotRef]] = {}
        for key in self.backend.list(RANKS):
            m = STREAM_RE.match(key)
            if not m:
                continue
            stream = m.group(0)
            sm = SNAPSHOT_RE.match(key[len(stream) :])
            if sm:
                ref = SnapshotRef(int(sm.group(1)), sm.group(2), key, stream)
                out.setdefault(int(m.group(1)), []).append(ref)
        for refs in out.values():
            refs.sort(key=lambda r: (r.generation, r.id), reverse=True)
        return out

    def find(self, wanted: str, stream: str) -> SnapshotRef | None:
        """A snapshot by id, id prefix (unique), or generation number, in
        `stream`; else by id or unique id prefix in any rank's stream."""
        refs = self.snapshots(stream)
        exact = [r for r in refs if r.id == wanted]
        if exact:
            return exact[0]
        if wanted.isdigit():
            by_gen = [r for r in refs if r.generation == int(wanted)]
            if by_gen:
                return by_gen[0]
        prefixed = [r for r in refs if r.id.startswith(wanted)] if len(wanted) >= 4 else []
        if len(prefixed) == 1:
            return prefixed[0]
        if prefixed or len(wanted) < 4:
            return None
        others = [r for rs in self.rank_snapshots().values() for r in rs if r.stream != stream]
        exact = [r for r in others if r.id == wanted]
        prefixed = exact or [r for r in others if r.id.startswith(wanted)]
        return prefixed[0] if len(prefixed) == 1 else None

    def all_snapshots(self, stream: str) -> list[SnapshotRef]:
        """`stream`'s snapshots, then every other rank's (`ckpt verify`)."""
        refs = self.snapshots(stream)
        for rank_refs in self.rank_snapshots().values():
            refs += [r for r in rank_refs if r.stream != stream]
        return refs
