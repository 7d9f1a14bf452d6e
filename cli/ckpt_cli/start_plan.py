"""What the child starts from: a pure decision over values.

`plan_start` (one node) and `plan_rank_start` (a rank of several) look at
what --dir holds (its scan), the snapshots a restore could use (loaded,
newest first, with the suspect marks) and the options, and return a
`StartPlan`: restore which snapshot, or use --dir as it is (holding a
snapshot, or newer than the newest one), or start fresh; what the console
says about it, and why. Nothing here reads a disk or a remote, or prints:
`restore.prepare_dir` gathers the values, carries the plan out and prints
its lines. What a restore replaces is moved aside, never deleted (`kept`).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from ckpt_cli.manifest import Manifest, ManifestError
from ckpt_cli.repository import SnapshotRef, pick
from ckpt_cli.snapshotter import LocalEntry
from ckpt_cli.world import Choice

#: What every "replacing it" line adds: the rule that nothing is lost.
ASIDE = " (files in no restorable snapshot are moved aside, never deleted)"


class Start(enum.Enum):
    """What --dir becomes before the child starts."""

    #: Restore a snapshot into --dir (what it held is moved aside).
    RESTORE = "restore"
    #: --dir holds the snapshot already: used as it is (torn files put back).
    USE = "use"
    #: --dir is newer than the newest snapshot: kept, and uploaded next.
    KEEP = "keep"
    #: Nothing restored: --dir as it is (created if missing, when `create`).
    FRESH = "fresh"
    #: A rank without a consistent cut: the single-node rule on its own stream.
    SINGLE = "single"


@dataclasses.dataclass(frozen=True)
class Note:
    """One console line of a plan: a warning or information."""

    text: str
    warn: bool = False


@dataclasses.dataclass(frozen=True)
class StartPlan:
    """The decision, and why (`notes`, said before it is carried out)."""

    start: Start
    notes: tuple[Note, ...] = ()
    #: RESTORE: the snapshot asked for by --snapshot; None: the one a
    #: restore picks (or `ref`, a rank's part of a step).
    snapshot: str | None = None
    ref: SnapshotRef | None = None
    #: USE, KEEP: the snapshot --dir descends from (the snapshotter's parent);
    #: RESTORE of a rank: the manifest `ref` names.
    parent: Manifest | None = None
    #: USE, KEEP: put back the torn files of --dir first.
    repair: bool = False
    #: FRESH: create --dir if missing.
    create: bool = False
    #: FRESH: make the newest snapshot (of the stream) the parent, untrusted.
    adopt_newest: bool = False

    @property
    def why(self) -> str:
        """The plan's reason in one line (its last note), '' if none."""
        return self.notes[-1].text if self.notes else ""


def has_data(local: Sequence[LocalEntry]) -> bool:
    """A file or link: a dir of empty dirs (a fresh volume's lost+found) holds nothing."""
    return any(e.type != "dir" for e in local)


def holds(local: Sequence[LocalEntry], manifest: Manifest) -> bool:
    """The scanned directory has exactly the manifest's files, by size and mtime."""
    local_files = {e.path: e for e in local if e.type == "file"}
    snap_files = {e.path: e for e in manifest.files}
    return local_files.keys() == snap_files.keys() and all(
        (le.size, le.mtime_ns) == (snap_files[p].size, snap_files[p].mtime_ns)
        for p, le in local_files.items()
    )


def clock(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def plan_start(
    directory: Path,
    local: Sequence[LocalEntry],
    loaded: Sequence[tuple[SnapshotRef, Manifest | ManifestError]],
    *,
    suspect: Collection[str] = frozenset(),
    stream: str = "",
    display: str = "the remote",
    restore_enabled: bool = True,
    snapshot: str | None = None,
    any_snapshot: bool | None = None,
) -> StartPlan:
    """What one node's child starts from.

    The rule: an explicit --snapshot is always restored. An empty or missing
    --dir gets the snapshot a restore picks (`repository.pick`: the newest
    verified one). A non-empty --dir that holds that snapshot already is
    used as it is. A non-empty --dir with a file modified after the newest
    snapshot was taken is kept (it is newer: a previous run on this machine
    got further than its last upload) and uploaded as the next snapshot.
    Otherwise (it holds another snapshot, or is older) --dir is replaced. A
    --dir that is kept has its torn files put back first (`repair`).

    local: the scan of --dir (empty if it is missing); loaded: every
    snapshot of the stream, newest first, or the error that makes it
    damaged; suspect: the keys marked suspect. Only what the rule needs is
    read: with --no-restore or --snapshot neither; with an empty --dir only
    whether the remote has a snapshot (`any_snapshot`, else `loaded`)."""
    if not restore_enabled:
        note = Note(f"--no-restore: starting from {directory} as it is")
        return StartPlan(Start.FRESH, (note,), create=True, adopt_newest=True)
    if snapshot is not None:
        return StartPlan(Start.RESTORE, snapshot=snapshot)
    if not has_data(local):
        if not (bool(loaded) if any_snapshot is None else any_snapshot):
            note = Note(f"remote has no snapshot yet: starting fresh in {directory}")
            return StartPlan(Start.FRESH, (note,), create=True)
        return StartPlan(Start.RESTORE)
    manifests = [m for _ref, m in loaded if isinstance(m, Manifest)]
    newest = manifests[0] if manifests else None
    chosen = pick(loaded, suspect)
    if newest is None or chosen is None:
        if loaded:
            note = Note(f"no snapshot in {display} is readable; keeping {directory} as it is", True)
        else:
            note = Note(f"remote has no snapshot yet: {directory} is uploaded as the first")
        return StartPlan(Start.FRESH, (note,))
    picked = chosen[1]
    if holds(local, picked):
        note = Note(f"{directory} already holds snapshot {picked.id}: nothing to restore")
        return StartPlan(Start.USE, (note,), parent=picked, repair=True)
    # Holding another snapshot exactly is proof of what it is that needs no
    # clock (the time test below compares this machine's clock with the
    # writer's): an older one, or one a restore does not pick (unverified,
    # suspect), is replaced by the one it picks.
    for m in manifests:
        if m.id != picked.id and holds(local, m):
            if m.generation < picked.generation:
                why = f"older than {picked.id} (generation {picked.generation})"
            else:
                mark = "suspect" if stream + m.key in suspect else "unverified"
                why = f"which a restore does not pick ({mark})"
            note = Note(
                f"{directory} holds snapshot {m.id} (generation {m.generation}), {why}: "
                f"replacing it{ASIDE}"
            )
            return StartPlan(Start.RESTORE, (note,))
    newest_local = max(e.mtime_ns for e in local) / 1e9
    if newest_local > newest.created:
        note = Note(
            f"{directory} was modified at {clock(newest_local)}, after the newest snapshot "
            f"{newest.id} ({clock(newest.created)}): keeping the local state, which "
            "becomes the next snapshot (restore the remote one with --snapshot ID)",
            warn=True,
        )
        return StartPlan(Start.KEEP, (note,), parent=newest, repair=True)
    note = Note(f"{directory} is older than snapshot {newest.id}: replacing it{ASIDE}")
    return StartPlan(Start.RESTORE, (note,))


def plan_rank_start(
    directory: Path,
    choice: Choice | None,
    local: Sequence[LocalEntry],
    *,
    rank: int,
    stream: str,
) -> StartPlan:
    """What a rank of several starts from, given `world.choose`'s choice
    (None: the repository has no snapshot) and the scan of --dir.

    A consistent cut: --dir is made to hold exactly this rank's part of the
    step (used as it is if it does, else replaced). No cut: the console says
    so, and a rank whose own newest snapshot is in its stream follows the
    single-node rule (SINGLE). No snapshot for this rank: --dir as it is."""
    if choice is None:
        return StartPlan(Start.SINGLE)
    notes: list[Note] = []
    if not choice.consistent:
        notes.append(Note(choice.note, warn=True))
        if choice.ref is not None and choice.ref.stream == stream:
            return StartPlan(Start.SINGLE, tuple(notes))
    m, ref = choice.manifest, choice.ref
    if m is None or ref is None:
        notes.append(Note(f"{choice.note}: starting from {directory} as it is"))
        return StartPlan(Start.FRESH, tuple(notes), create=True, adopt_newest=True)
    if choice.consistent:
        notes.append(Note(f"restoring rank {rank}'s snapshot {m.id} of {choice.note}"))
    if holds(local, m):
        notes.append(Note(f"{directory} already holds snapshot {m.id}: nothing to restore"))
        return StartPlan(Start.USE, tuple(notes), parent=m)
    if local:
        notes.append(
            Note(
                f"{directory} differs from snapshot {m.id}: replacing it, so that every rank "
                f"starts from the same step{ASIDE}"
            )
        )
    return StartPlan(Start.RESTORE, tuple(notes), ref=ref, parent=m)
