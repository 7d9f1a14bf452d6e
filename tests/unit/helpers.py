"""Small helpers shared by the unit tests (not fixtures)."""

from __future__ import annotations

import os
import random
from pathlib import Path

from ckpt_cli.backends import Backend, read_whole_into

#: A small chunk size so multi-chunk files stay tiny.
CHUNK = 4096
#: Far enough in the past that the racy-timestamp rule never applies.
OLD_NS = 1_600_000_000 * 10**9


def data(seed: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes: distinct seeds give distinct chunks."""
    return random.Random(seed).randbytes(size)


def write(path: Path, content: bytes, *, mtime_ns: int = OLD_NS, mode: int | None = None) -> Path:
    """Write a file and date it into the past (older than the racy window)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    if mode is not None:
        os.chmod(path, mode)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything below root (not following links): type, mode, mtime and content."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("symlink", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, st.st_mtime_ns)
            else:
                out[rel] = ("file", st.st_mode & 0o7777, st.st_mtime_ns, p.read_bytes())
    return out


class DelegatingBackend:
    """A backend that passes every call to `inner`; tests override what they observe.
    It claims no capability: the plain paths (a copy for every put, reads
    whole, a confirmed create)."""

    exclusive_create = False
    borrows_buffers = False
    reads_into = False
    local_io = False

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.display = inner.display

    def read(self, key: str) -> bytes:
        return self.inner.read(key)

    def read_into(self, key: str, view: memoryview) -> int:
        return read_whole_into(self, key, view)

    def write(self, key: str, data: bytes) -> None:
        self.inner.write(key, data)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        return self.inner.create_exclusive(key, data)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def rename(self, src: str, dst: str) -> None:
        self.inner.rename(src, dst)

    def names(self) -> list[str]:
        return self.inner.names()

    def list(self, prefix: str, *, temp: bool = False) -> list[str]:
        return self.inner.list(prefix, temp=temp)
