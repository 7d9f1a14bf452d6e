"""What a restore replaces, and restores cut short.

ckpt never deletes a byte it has not made durable somewhere: the entries a
restore replaces go to a kept dir (beside --dir, or inside it for a restore
in place), less the files and links a restorable snapshot holds at the same
path, size and mtime, a file only where its bytes hash to the chunks that
snapshot stores it as and those chunks read back whole. Recovery after a
kill puts back or keeps what was moved aside and finishes a move in place,
touching only this user's real directories.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ckpt._fs import (
    KEPT_PREFIX,
    MARKER,
    OLD_PREFIX,
    SAVE_PREFIX,
    finish_move_in,
    read_marker,
    remove_tree,
)
from ckpt_cli import console
from ckpt_cli.errors import RemoteError
from ckpt_cli.manifest import Manifest
from ckpt_cli.repository import Repository, iter_manifests

#: Name prefix (after ".NAME" beside --dir, alone inside it) of a staging dir.
RESTORE_PREFIX = ".ckpt-restore-"


def kept_name(target: Path, *, inside: bool) -> Path:
    """Where replaced files go: `.NAME.ckpt-kept-STAMP-XXXX` beside the
    target, or `.ckpt-kept-STAMP-XXXX` inside it (a restore in place)."""
    stamp = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(2)
    if inside:
        return target / f"{KEPT_PREFIX}{stamp}"
    return target.parent / f".{target.name}{KEPT_PREFIX}{stamp}"


def _ours(p: Path) -> str | None:
    """Why recovery must not touch p (a symlink, not a directory, another
    user's), None if it is a directory of this user's."""
    try:
        st = p.lstat()
    except FileNotFoundError:
        return "gone"
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by this user ({os.geteuid()})"
    return None


def _real_dir(p: Path) -> bool:
    try:
        return stat.S_ISDIR(p.lstat().st_mode)
    except OSError:
        return False


def recover_interrupted(target: Path) -> None:
    """Clean up after a restore (or a save of the shim) that was killed.

    Beside the target: a moved-aside directory is put back if the target is
    missing, else kept (renamed `.NAME.ckpt-kept-*`); a staging dir is
    deleted, unless the swap already happened (the target is marked), when
    it holds the old content and is kept. Inside the target: a move in
    place that was cut short is finished. Only this user's real directories
    are touched: a symlink or another user's entry is refused with a
    warning and left alone. Nothing that may hold the only copy of a file
    is deleted."""
    parent = target.parent
    if not parent.is_dir():
        return
    real = _real_dir(target)
    marker = read_marker(target) if real else None
    for p in sorted(parent.iterdir()):
        old = p.name.startswith(f".{target.name}{OLD_PREFIX}")
        staging = p.name.startswith(f".{target.name}{RESTORE_PREFIX}")
        if not (old or staging):
            continue
        why = _ours(p)
        if why is not None:
            if why != "gone":
                console.warn(f"left {p} alone: it is {why}, not a directory ckpt moved aside")
            continue
        if old and not os.path.lexists(target):
            os.rename(p, target)
            console.warn(f"put back {target}, moved aside by a restore that was interrupted")
            real = True
            marker = read_marker(target)
        elif old or (marker is not None and read_marker(p) is None):
            kept = kept_name(target, inside=False)
            os.rename(p, kept)
            console.warn(
                f"kept what an interrupted restore replaced in {target} at {kept} "
                "(move it back, or delete it when you do not need it)"
            )
        else:
            remove_tree(p)  # a staging dir: verified remote content
    if marker is not None:
        _finish_marked(target, marker)
    if real:
        for name in os.listdir(target):  # staging of a restore in place killed before its move
            staged = name.startswith((RESTORE_PREFIX, SAVE_PREFIX))
            if staged and _ours(target / name) is None:
                remove_tree(target / name)
            elif name.startswith(f"{MARKER}-") and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(target / name)


def _finish_marked(target: Path, marker: dict[str, str]) -> None:
    """A marker inside target: finish the move in place it describes, or
    drop it (a swap that only lacked its last step)."""
    staging, holding = marker.get("staging", ""), marker.get("holding", "")
    if staging and holding and marker.get("phase") in ("out", "in"):
        if _ours(target / holding) is None and _ours(target / staging) in (None, "gone"):
            finish_move_in(target, marker)
            console.warn(
                f"finished a restore into {target} that was interrupted; what it replaced "
                f"is in {target / holding}"
            )
            return
        console.warn(f"{target / MARKER} names entries that are not ckpt's: removed it")
    with contextlib.suppress(OSError):
        os.unlink(target / MARKER)


@dataclasses.dataclass
class Durable:
    """What a restorable snapshot holds: files by (path, size, mtime) with
    the chunks each snapshot stores them as, links by (path, target). A local
    file that matches one is not the only copy only when its bytes are those
    chunks and they read back whole (`holds`): metadata alone proves nothing
    (a copy with its mtime kept, a chunk a crash emptied)."""

    files: dict[tuple[str, int, int], set[tuple[str, ...]]]
    links: frozenset[tuple[str, str]]
    #: Reads a chunk back whole (its size and hash); None: no remote to ask.
    repo: Repository | None = None
    chunk_size: int = 0
    #: Chunks known whole (the restore just read and hashed them), or not.
    verdicts: dict[str, bool] = dataclasses.field(default_factory=dict)

    def holds(self, path: Path, key: tuple[str, int, int]) -> bool:
        """Whether a snapshot stores exactly the bytes of the local file at
        path (whose path, size and mtime are key), in chunks that read back."""
        stored = self.files.get(key)
        if not stored or self.repo is None or self.chunk_size <= 0:
            return False
        try:
            local = _chunk_names(path, self.chunk_size, self.repo.hash)
        except OSError:
            return False
        if local not in stored:
            return False
        lengths = _lengths(local, key[1], self.chunk_size)
        return all(self._whole(self.repo, d, n) for d, n in lengths)

    def _whole(self, repo: Repository, digest: str, size: int) -> bool:
        from ckpt_cli.chunks import ChunkError

        if digest not in self.verdicts:
            try:
                repo.chunks.get(digest, size)
                self.verdicts[digest] = True
            except (ChunkError, RemoteError, OSError):
                self.verdicts[digest] = False
        return self.verdicts[digest]


def _chunk_names(path: Path, chunk_size: int, hash: Callable[[bytes], str]) -> tuple[str, ...]:
    """The chunk names of a local file's bytes, as a snapshot would store them."""
    names = []
    with open(path, "rb", buffering=0) as f:
        while piece := f.read(chunk_size):
            names.append(hash(piece))
    return tuple(names)


def _lengths(names: tuple[str, ...], size: int, chunk_size: int) -> list[tuple[str, int]]:
    return [(d, min(chunk_size, size - i * chunk_size)) for i, d in enumerate(names)]


def durable_in(manifests: Iterable[Manifest]) -> Durable:
    files: dict[tuple[str, int, int], set[tuple[str, ...]]] = {}
    links = set()
    for m in manifests:
        for e in m.entries:
            if e.type == "file":
                files.setdefault((e.path, e.size, e.mtime_ns), set()).add(tuple(e.chunks))
            elif e.type == "symlink":
                links.add((e.path, e.target))
    return Durable(files, frozenset(links))


def restorable(repo: Repository, restoring: Manifest) -> Durable:
    """The snapshot being restored (its chunks read and hashed by the
    restore) and every other one whose chunks are all in the store (read
    back before a file is taken for held by one). A remote that fails here
    counts only the first (keeps more)."""
    manifests = [restoring]
    try:
        present = repo.present_chunks()
        for _ref, m in iter_manifests(repo):
            whole = isinstance(m, Manifest) and all(d in present for d in m.chunk_digests())
            if whole and isinstance(m, Manifest) and m.id != restoring.id:
                manifests.append(m)
    except (RemoteError, OSError):
        pass
    durable = durable_in(manifests)
    durable.repo = repo
    durable.chunk_size = restoring.chunk_size
    durable.verdicts = dict.fromkeys(restoring.chunk_digests(), True)
    return durable


def prune_durable(root: Path, durable: Durable) -> tuple[int, int]:
    """Delete from root (a kept dir) the files and links a restorable snapshot
    holds at the same path, other files (sockets, fifos: no data) and the
    directories left empty; return (files, bytes) kept. Never follows a link."""
    kept = size = 0
    dirs: list[tuple[Path, str]] = [(root, "")]
    order: list[Path] = []
    while dirs:
        here, rel = dirs.pop()
        order.append(here)
        try:
            entries = list(os.scandir(here))
        except OSError:
            continue
        for d in entries:
            path = f"{rel}{d.name}"
            try:
                st = d.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    dirs.append((Path(d.path), path + "/"))
                elif stat.S_ISREG(st.st_mode):
                    if durable.holds(Path(d.path), (path, st.st_size, st.st_mtime_ns)):
                        os.unlink(d.path)
                    else:
                        kept, size = kept + 1, size + st.st_size
                elif stat.S_ISLNK(st.st_mode):
                    if (path, os.readlink(d.path)) in durable.links:
                        os.unlink(d.path)
                    else:
                        kept += 1
                else:
                    os.unlink(d.path)
            except OSError:
                kept += 1  # left where it is
    for here in reversed(order):  # deepest first
        with contextlib.suppress(OSError):
            os.rmdir(here)
    return kept, size


def keep(
    kept: Path, target: Path, durable: Callable[[], Durable], warn: Callable[[str], None]
) -> None:
    """Drop what a restorable snapshot holds from the replaced content at
    kept; say where the rest is."""
    with contextlib.suppress(OSError):
        kept.rmdir()  # empty: nothing was replaced, no manifest to read
        return
    files, size = prune_durable(kept, durable())
    if files:
        warn(
            f"{files} file(s) of {target} ({console.fmt_bytes(size)}) were in no restorable "
            f"snapshot: moved to {kept}, not deleted (move them back, or delete it when you "
            "do not need them)"
        )


def kept_dirs(directory: Path) -> list[Path]:
    """The kept dirs of earlier restores: beside the directory and inside it."""
    beside = f".{directory.name}{KEPT_PREFIX}"
    out: list[Path] = []
    for where, prefix in ((directory.parent, beside), (directory, KEPT_PREFIX)):
        with contextlib.suppress(OSError):
            out += [where / n for n in os.listdir(where) if n.startswith(prefix)]
    return sorted(out)


def remind_kept(directory: Path) -> None:
    """Say at every start that replaced files are waiting (never deleted for
    the user: a user who never looks sees this line in every log)."""
    kept = kept_dirs(directory)
    if kept:
        more = f" and {len(kept) - 1} more" if len(kept) > 1 else ""
        console.info(
            f"files earlier restores replaced are kept in {kept[-1]}{more}: move back "
            "what you need and delete the rest (ckpt never deletes them)"
        )
