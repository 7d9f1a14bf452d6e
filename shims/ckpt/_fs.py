"""Swap a directory in with one rename, and write a file atomically without
widening its mode. Standard library only; the shim's save(dir) and the
supervisor's restore both use it.

Linux has renameat2(RENAME_EXCHANGE), which swaps two paths atomically.
Elsewhere (or on filesystems without it) two renames are used; a crash
between them leaves the old content at `.NAME.ckpt-old-XXXX` beside the
target, which the supervisor's next start moves back. Nothing here deletes
the old content: swap_in says where it is, and the caller decides.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import stat
import sys
from collections.abc import Callable
from pathlib import Path

#: Name prefix (after ".NAME") of a directory moved aside by the fallback.
OLD_PREFIX = ".ckpt-old-"

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
#: Bits a file or directory ckpt creates never carries: setuid, setgid, sticky.
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


@functools.cache
def _renameat2() -> Callable[[bytes, bytes], bool] | None:
    """renameat2(RENAME_EXCHANGE) from libc, looked up once; None if missing."""
    if sys.platform != "linux":
        return None
    import ctypes  # here: ctypes costs every `import ckpt` (and ckpt's start) 10 ms
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None

    def exchange(a: bytes, b: bytes) -> bool:
        return int(fn(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)) == 0

    return exchange


def swap_in(new: Path, target: Path) -> Path | None:
    """Make `new` the target directory in one step. Returns where the old
    content is now (`new`, or `.NAME.ckpt-old-XXXX` beside the target if the
    last rename failed), None if there was no target; never deletes it."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return None
    exchange = _renameat2()
    if exchange is not None and exchange(os.fsencode(new), os.fsencode(target)):
        return new
    old = target.with_name(f".{target.name}{OLD_PREFIX}{os.urandom(4).hex()}")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)
        raise
    try:
        os.rename(old, new)
    except OSError:
        return old
    return new


def existing_mode(path: Path) -> int | None:
    """The permission bits of the file at path (special bits dropped), None
    if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return stat.S_IMODE(st.st_mode) & ~SPECIAL_BITS


def create_beside(tmp: Path, target: Path) -> int:
    """Open a new file `tmp` for writing, to be renamed over `target`: never
    through a link and never an existing file. It gets target's permission
    bits if target exists (special bits dropped), else the umask's default,
    so an atomic rewrite never makes a private file readable by others."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    mode = existing_mode(target)
    if mode is None:
        return os.open(tmp, flags, 0o666)
    fd = os.open(tmp, flags, 0o600)
    try:
        os.fchmod(fd, mode)
    except OSError:
        os.close(fd)
        raise
    return fd


#: The most one write call hands the kernel. On the benchmark VM a buffered
#: write of a whole 8 MiB chunk into new page-cache pages cost 2.3-3.0 s of
#: system time per GiB right after other large writes, all of it in
#: copy_folio_from_iter_atomic (perf); pieces of 256 KiB took 0.2-1.2 s
#: (two modes), pieces of 64 KiB 0.25-0.4 s every time (bench/tools/
#: pwrite_sizes.py, case 11). A piece bounds the page-cache folio the
#: kernel allocates for it; 16,384 calls per GiB cost a few ms.
WRITE_PIECE = 64 * 1024


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int | None = None) -> None:
    """Write every byte of data to fd, WRITE_PIECE at a time: at offset
    (pwrite), or at the file position. A nearly full disk takes part of a
    piece and returns a short count; only the next call raises ENOSPC."""
    view = memoryview(data).cast("B")
    while view:
        piece = view[:WRITE_PIECE]
        n = os.write(fd, piece) if offset is None else os.pwrite(fd, piece, offset)
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[n:]
        if offset is not None:
            offset += n


# ---------------------------------------------------------------- in place

#: Names inside a directory that belong to ckpt (never snapshotted: the
#: ".ckpt-*" temp pattern): a move in progress, its staging and holding dirs.
RESERVED = ".ckpt-"
#: The marker of a move in progress inside a directory (JSON: staging,
#: holding, phase). While it exists the directory is not whole.
MARKER = ".ckpt-moving"
#: A directory that holds what a move in place (or a restore) replaced.
KEPT_PREFIX = ".ckpt-kept-"
#: A copy the shim's save(dir) makes before it moves it in.
SAVE_PREFIX = ".ckpt-save-"
#: The filesystem's own directory at the root of a volume: never moved.
LOST_FOUND = "lost+found"


def is_reserved(name: str) -> bool:
    return name.startswith(RESERVED)


def cannot_swap(target: Path) -> str | None:
    """Why the directory `target` cannot be replaced by a rename (a mount
    point, or a parent ckpt may not write), None if it can."""
    if is_mount_point(target):
        return "is a mount point"
    if not os.access(target.parent, os.W_OK | os.X_OK):
        return "is in a directory that cannot be written"
    return None


def is_mount_point(path: Path) -> bool:
    """Also a bind mount of the same filesystem, which os.path.ismount misses."""
    if os.path.ismount(path):
        return True
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            points = {_unescape(line.split(" ")[4]) for line in f if line.count(" ") >= 4}
    except OSError:
        return False
    return str(path) in points


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def write_marker(directory: Path, doc: dict[str, str]) -> None:
    """Write the marker inside directory in one rename."""
    tmp = directory / f"{MARKER}-{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        os.replace(tmp, directory / MARKER)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_marker(directory: Path) -> dict[str, str] | None:
    """The marker of an unfinished move, None if there is none. One that does
    not parse or names something outside the directory counts as a marker
    with nothing to finish (it is still proof the move was not finished)."""
    path = directory / MARKER
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return {}  # a link, or unreadable: proof enough that a move was under way
    try:
        raw = os.read(fd, 4096) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        raw = b""
    finally:
        os.close(fd)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(doc, dict):
        return {}
    out = {k: v for k, v in doc.items() if isinstance(k, str) and isinstance(v, str)}
    for key in ("staging", "holding"):
        name = out.get(key, "")
        if name and (not is_reserved(name) or "/" in name or name in (MARKER,)):
            return {}
    return out


def move_in(staging: Path, target: Path, holding: Path) -> None:
    """Replace the entries of `target` by those of `staging` (a directory
    inside it), moving the old ones into `holding` (also inside it): for a
    directory that cannot be swapped by a rename. Names ckpt reserves stay.
    A marker says the move is under way until it is done; if the process
    dies, finish_move_in (the supervisor's next start) completes it. A
    failure while moving the old entries out puts them back."""
    doc = {"staging": staging.name, "holding": holding.name, "phase": "out"}
    write_marker(target, doc)
    finish_move_in(target, doc)


def finish_move_in(target: Path, doc: dict[str, str]) -> None:
    """Go on with the move `doc` (the marker) describes, from its phase."""
    staging, holding = target / doc["staging"], target / doc["holding"]
    if doc.get("phase") == "out":
        try:
            for name in sorted(os.listdir(target)):
                if not is_reserved(name) and name != LOST_FOUND:
                    os.rename(target / name, holding / name)
        except OSError:
            for name in os.listdir(holding):  # put back what was moved: nothing changed
                with contextlib.suppress(OSError):
                    os.rename(holding / name, target / name)
            with contextlib.suppress(OSError):
                os.unlink(target / MARKER)
            raise
        doc = {**doc, "phase": "in"}
        write_marker(target, doc)
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(staging)):
            if not os.path.lexists(target / name):  # only lost+found can be there
                os.rename(staging / name, target / name)
            elif name == LOST_FOUND:
                _merge_lost_found(staging / name, target / name)
    os.unlink(target / MARKER)
    remove_tree(staging)  # empty, or what the volume's own lost+found already had


def _merge_lost_found(staged: Path, own: Path) -> None:
    """The snapshot's lost+found into the volume's own, which is never moved
    (the filesystem's): each entry whose name is free there. A name the
    volume's own already has stays the volume's (the snapshot's is in the
    remote still)."""
    if os.path.islink(own) or not os.path.isdir(own):
        return
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(staged)):
            if not os.path.lexists(own / name):
                os.rename(staged / name, own / name)


def remove_tree(top: Path) -> None:
    """shutil.rmtree(top, ignore_errors=True) without recursion: the rmtree of
    Python 3.11 recurses once per level, and its RecursionError (a tree 1,000
    levels deep, which a crafted snapshot or a script can make) is no OSError
    that ignore_errors would ignore. Links are removed, never followed."""
    stack, seen = [os.fspath(top)], []
    while stack:
        directory = stack.pop()
        seen.append(directory)
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            with contextlib.suppress(OSError):
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                else:
                    os.unlink(e.path)
    for directory in reversed(seen):  # children before their parents
        with contextlib.suppress(OSError):
            os.rmdir(directory)
