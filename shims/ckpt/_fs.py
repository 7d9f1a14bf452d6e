"""Swap a directory in with one rename. Standard library only; the shim's
save(dir) and the supervisor's restore both use it.

Linux has renameat2(RENAME_EXCHANGE), which swaps two paths atomically.
Elsewhere (or on filesystems without it) two renames are used; a crash
between them leaves the old content at `.NAME.ckpt-old-XXXX` beside the
target, which the supervisor's next start moves back.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

#: Name prefix (after ".NAME") of a directory moved aside by the fallback.
OLD_PREFIX = ".ckpt-old-"

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


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


def swap_in(new: Path, target: Path) -> None:
    """Make `new` the target directory in one step; the old content ends at
    `new`, for the caller to delete."""
    if not target.exists():
        os.rename(new, target)
        return
    exchange = _renameat2()
    if exchange is not None and exchange(os.fsencode(new), os.fsencode(target)):
        return
    old = target.with_name(f".{target.name}{OLD_PREFIX}{os.urandom(4).hex()}")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)
        raise
    with contextlib.suppress(OSError):
        os.rename(old, new)
    shutil.rmtree(old, ignore_errors=True)
