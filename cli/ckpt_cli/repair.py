"""Relaunch onto the last whole state: files, and checkpoint directories, that
a child left torn are put back from the newest snapshot that holds a whole
version of them, before the child is launched on them.

Torn: failing its format check (`formats`: a zip without its end record, an
HF `checkpoint-N/` without its trainer_state.json). Files identical to a
verified snapshot's are not read again. For each torn path:
- a snapshot of this stream (newest first, none marked suspect) holds a
  whole version: that version is materialised (every chunk verified) into a
  staging dir inside --dir, the torn one is moved to a kept dir inside
  --dir (`kept.kept_name`; a file by a hard link, so the path flips from
  torn to whole in one rename), and the whole one renamed into place;
- a torn checkpoint directory that no snapshot holds whole, beside a whole
  one of its format (checkpoint-2/ beside a torn checkpoint-3/): moved to
  the kept dir, so that a loader that picks the newest (HF Trainer's
  get_last_checkpoint picks the highest N, whole or not) finds the last
  whole one;
- otherwise it is left as it is, with a warning.
Nothing is deleted: the torn bytes stay in the kept dir. Whole in a
snapshot: the stored bytes pass the file's check, read through
`repo_tools.ChunkSource` (only the chunks the check needs), or, for a
directory, the snapshot's entries pass the directory's check.

`find_torn` and `plan` decide; `apply` acts; `repair_dir` does the three and
says what it did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from ckpt._fs import remove_tree
from ckpt_cli import console
from ckpt_cli.errors import RemoteError
from ckpt_cli.formats import DEFAULT, Registry
from ckpt_cli.kept import RESTORE_PREFIX, kept_name
from ckpt_cli.manifest import Manifest, ManifestError
from ckpt_cli.repository import ChunkError, Repository, SnapshotRef
from ckpt_cli.restore import materialise
from ckpt_cli.snapshotter import TEMP_PATTERNS, LocalEntry, scan
from ckpt_cli.verify import ChunkSource


@dataclasses.dataclass(frozen=True)
class Torn:
    path: str  # relative to --dir
    type: str  # "file" | "dir"
    reason: str  # the check's verdict: "zip: no end-of-central-directory record"
    check: str = ""  # the check that failed ("zip", "hf-trainer")


@dataclasses.dataclass
class Repaired:
    """What a repair did: paths put back (with the snapshot each came from),
    torn directories moved aside, torn paths left; where the torn ones are."""

    restored: list[tuple[Torn, SnapshotRef]] = dataclasses.field(default_factory=list)
    aside: list[Torn] = dataclasses.field(default_factory=list)
    left: list[Torn] = dataclasses.field(default_factory=list)
    kept: Path | None = None

    @property
    def empty(self) -> bool:
        return not (self.restored or self.aside or self.left)

    def event(self) -> dict[str, Any]:
        """The `repair` event's fields."""
        return {
            "files": [
                {"path": t.path, "snapshot": ref.id, "generation": ref.generation}
                for t, ref in self.restored
            ],
            "moved_aside": [t.path for t in self.aside],
            "left": [{"path": t.path, "reason": t.reason} for t in self.left],
            "kept": str(self.kept) if self.kept is not None else None,
        }


# ---------------------------------------------------------------- deciding


def trusted_files(parent: Manifest | None) -> set[tuple[str, int, int]]:
    """Files (path, size, mtime) known whole without a look: those of a
    verified snapshot (every file of it was whole when it was taken)."""
    if parent is None or parent.verified is not True:
        return set()
    return {(e.path, e.size, e.mtime_ns) for e in parent.files}


def changed_since(entries: Iterable[LocalEntry], parent: Manifest | None) -> set[str]:
    """Paths of files added or modified since `parent` (a directory format's
    check needs them: data written again without a new marker is torn)."""
    if parent is None:
        return set()
    old = {e.path: (e.size, e.mtime_ns) for e in parent.files}
    return {
        le.path
        for le in entries
        if le.type == "file" and old.get(le.path) != (le.size, le.mtime_ns)
    }


def find_torn(
    root: Path,
    entries: list[LocalEntry],
    *,
    registry: Registry = DEFAULT,
    trusted: Collection[tuple[str, int, int]] = (),
    changed: Collection[str] = (),
) -> tuple[list[Torn], dict[str, str]]:
    """The torn directories (first) and files of a scan of root, and every
    recognised directory that is whole (path -> its check), for `plan`."""
    verdicts = registry.check_tree(entries, changed=changed)
    torn = [
        Torn(rel, "dir", v.reason, v.check) for rel, v in sorted(verdicts.items()) if v.ok is False
    ]
    whole_dirs = {rel: v.check for rel, v in verdicts.items() if v.ok is True}
    below = tuple(f"{t.path}/" for t in torn)
    for le in entries:
        if le.type != "file" or le.path.startswith(below):
            continue
        if (le.path, le.size, le.mtime_ns) in trusted:
            continue
        v = registry.check_file(root / le.path, rel=le.path)
        if v.ok is False:
            torn.append(Torn(le.path, "file", v.reason, v.check))
    return torn, whole_dirs


def has_whole_sibling(torn: Torn, whole_dirs: dict[str, str]) -> bool:
    """A whole directory of the same format beside a torn one."""
    parent = torn.path.rpartition("/")[0]
    return any(
        rel.rpartition("/")[0] == parent and check == torn.check
        for rel, check in whole_dirs.items()
    )


def holds_whole(
    repo: Repository,
    m: Manifest,
    torn: Torn,
    local: LocalEntry | None,
    registry: Registry = DEFAULT,
) -> bool:
    """The snapshot m holds a whole version of the torn path: not the same
    bytes as the torn one, not named as in progress when it was taken, and
    passing the check (a file: its stored bytes, read chunk by chunk, each
    verified; a directory: the snapshot's names)."""
    in_progress = {p for p, _why in m.unverified}
    if torn.type == "dir":
        inside = f"{torn.path}/"
        if any(p == torn.path or p.startswith(inside) for p in in_progress):
            return False
        if not any(e.path == torn.path and e.type == "dir" for e in m.entries):
            return False
        verdict = registry.check_tree(m.entries).get(torn.path)
        return verdict is not None and verdict.ok is True
    e = next((x for x in m.files if x.path == torn.path), None)
    if e is None or torn.path in in_progress:
        return False
    if local is not None and (e.size, e.mtime_ns) == (local.size, local.mtime_ns):
        return False  # the torn bytes themselves
    try:
        v = registry.check_source(torn.path, ChunkSource(repo, e, m.chunk_size))
    except ChunkError:
        return False
    return v.ok is True or (v.ok is None and bool(e.check))


def candidates(repo: Repository) -> Iterator[tuple[SnapshotRef, Manifest]]:
    """This stream's snapshots that may hold a whole version, newest first,
    loaded on demand (a suspect one is never a source)."""
    suspect = repo.suspect_keys()
    for ref in repo.snapshots():
        if ref.key in suspect:
            continue
        with contextlib.suppress(ManifestError):
            yield ref, repo.load_cached(ref)


# ---------------------------------------------------------------- acting


def _put_back(repo: Repository, root: Path, torn: Torn, m: Manifest, kept: Path) -> None:
    """Materialise torn.path from m into a staging dir inside root, move the
    torn one into kept, rename the whole one into place. Raises
    (ChunkError, ManifestError, OSError) with the torn one in place."""
    if torn.type == "dir":
        inside = f"{torn.path}/"
        entries = tuple(e for e in m.entries if e.path == torn.path or e.path.startswith(inside))
    else:
        entries = tuple(e for e in m.entries if e.path == torn.path)
    staging = root / f"{RESTORE_PREFIX}{secrets.token_hex(4)}"
    try:
        materialise(repo, dataclasses.replace(m, entries=entries), staging)
        aside = kept / torn.path
        aside.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        here = root / torn.path
        moved = False
        if torn.type == "file":
            try:
                os.link(here, aside, follow_symlinks=False)  # both names: then one rename
            except OSError:
                os.rename(here, aside)
                moved = True
        else:
            os.rename(here, aside)
            moved = True
        try:
            os.rename(staging / torn.path, here)
        except OSError:
            if moved:  # the torn one goes back where it was: nothing missing
                with contextlib.suppress(OSError):
                    os.rename(aside, here)
            raise
    finally:
        remove_tree(staging)


def _move_aside(root: Path, torn: Torn, kept: Path) -> None:
    aside = kept / torn.path
    aside.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.rename(root / torn.path, aside)


def apply(
    repo: Repository,
    root: Path,
    torn: list[Torn],
    whole_dirs: dict[str, str],
    local: dict[str, LocalEntry],
    *,
    registry: Registry = DEFAULT,
    warn: Callable[[str], None] = console.warn,
) -> Repaired:
    """Put back, move aside or leave each torn path (module docstring)."""
    done = Repaired()
    sources: list[tuple[SnapshotRef, Manifest]] = []
    more = candidates(repo)

    def snapshots() -> Iterator[tuple[SnapshotRef, Manifest]]:
        yield from sources  # loaded for an earlier torn path
        for found in more:
            sources.append(found)
            yield found

    def kept() -> Path:
        if done.kept is None:
            done.kept = kept_name(root, inside=True)
            done.kept.mkdir(mode=0o700)
        return done.kept

    for t in torn:
        put = None
        try:
            for ref, m in snapshots():
                if not holds_whole(repo, m, t, local.get(t.path), registry):
                    continue
                try:
                    _put_back(repo, root, t, m, kept())
                except (ChunkError, ManifestError) as exc:
                    warn(f"snapshot {ref.id} holds {t.path} but cannot give it back ({exc})")
                    continue
                put = ref
                break
        except (OSError, RemoteError) as exc:
            warn(f"could not put back {t.path}: {getattr(exc, 'strerror', None) or exc}")
            done.left.append(t)
            continue
        if put is not None:
            done.restored.append((t, put))
        elif t.type == "dir" and has_whole_sibling(t, whole_dirs):
            try:
                _move_aside(root, t, kept())
                done.aside.append(t)
            except OSError as exc:
                warn(f"could not move {t.path}/ aside: {exc.strerror or exc}")
                done.left.append(t)
        else:
            done.left.append(t)
    with contextlib.suppress(OSError):
        if done.kept is not None:
            done.kept.rmdir()  # nothing went there after all
            done.kept = None
    return done


def say(done: Repaired, root: Path, warn: Callable[[str], None] = console.warn) -> None:
    """One line per snapshot files came from, per move aside, per path left."""
    by_snapshot: dict[str, tuple[SnapshotRef, list[str]]] = {}
    for t, ref in done.restored:
        by_snapshot.setdefault(ref.key, (ref, []))[1].append(
            t.path + ("/" if t.type == "dir" else "")
        )
    where = f"; the torn ones are kept in {done.kept}" if done.kept is not None else ""
    for ref, paths in by_snapshot.values():
        shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        warn(
            f"put back {len(paths)} torn path(s) of {root} from snapshot {ref.id} "
            f"(generation {ref.generation}), the newest whole version: {shown}{where}"
        )
    for t in done.aside:
        warn(
            f"{t.path}/ is torn ({t.reason}) and no snapshot holds it whole: moved to "
            f"{done.kept}, so that a loader picking the newest finds the last whole one"
        )
    for t in done.left:
        warn(
            f"{t.path} is torn ({t.reason}) and no snapshot holds a whole version of it: "
            "left as it is"
        )


def repair_dir(
    repo: Repository,
    root: Path,
    patterns: Iterable[str],
    *,
    parent: Manifest | None,
    registry: Registry = DEFAULT,
    warn: Callable[[str], None] = console.warn,
) -> Repaired:
    """Find what is torn in root and put back what a snapshot holds whole;
    say what was done. `parent`: the snapshot root descends from (its files
    are not read again when it is verified)."""
    if not root.is_dir():
        return Repaired()
    try:
        entries = scan(root, (*TEMP_PATTERNS, *patterns))  # never a kept dir of ckpt's
    except OSError as exc:
        warn(f"could not look for torn files in {root}: {exc.strerror or exc}")
        return Repaired()
    trusted = trusted_files(parent)
    torn, whole_dirs = find_torn(
        root,
        entries,
        registry=registry,
        trusted=trusted,
        changed=changed_since(entries, parent),
    )
    looked = sum(1 for le in entries if (le.path, le.size, le.mtime_ns) not in trusted)
    console.debug(
        f"looked for torn files in {root}: {looked} of {len(entries)} entries checked, "
        f"{len(torn)} torn{': ' + ', '.join(t.path for t in torn) if torn else ''}"
    )
    if not torn:
        return Repaired()
    local = {le.path: le for le in entries}
    done = apply(repo, root, torn, whole_dirs, local, registry=registry, warn=warn)
    say(done, root, warn)
    return done
