"""Storage faults for the fault-injection suite: size-limited tmpfs mounts (a
disk that fills up), read-only views of a directory, running the real `ckpt`
where those mounts are visible, and a byte-level view of a remote's objects
(file:// or S3, written behind ckpt's back with fsspec/s3fs directly).

Mounts:

- As root, `small_fs` mounts a tmpfs of the given size at a path in the test's
  tmp dir, and `read_only` bind-mounts a directory onto itself read-only; both
  are unmounted in a `finally`.
- Not root, `small_fs` keeps a process in a new user + mount namespace
  (`unshare --user --map-root-user --mount`, where an unprivileged user may
  mount a tmpfs) and runs ckpt inside it with `nsenter`; the test sees the
  mount through /proc/PID/root. Killing that process ends the mount. Neither
  possible: pytest.skip with the reason. `read_only` uses chmod instead.
  CKPT_FAULTS_MOUNT=userns forces the namespace way (to check it as root).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CKPT
from integration._util import RUN_TIMEOUT, error_lines

MOUNT_MODE_ENV = "CKPT_FAULTS_MOUNT"


def _as_root() -> bool:
    return os.geteuid() == 0 and os.environ.get(MOUNT_MODE_ENV, "") != "userns"


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, check=False, text=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=60
    )


@dataclasses.dataclass(frozen=True)
class SmallFs:
    """A size-limited filesystem: `path` is where ckpt (run with `prefix`)
    sees it, `view` where this test process reads and writes it."""

    path: Path
    view: Path
    prefix: tuple[str, ...]

    def seen(self, inside: Path) -> Path:
        """The test's view of a path below `path`."""
        return self.view / inside.relative_to(self.path)

    def free(self) -> int:
        st = os.statvfs(self.view)
        return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def small_fs(where: Path, size: str) -> Iterator[SmallFs]:
    """A tmpfs of `size` (mount's syntax: 4m, 512k) at `where` (created)."""
    where.mkdir(parents=True, exist_ok=True)
    if _as_root():
        res = _run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)])
        if res.returncode != 0:
            pytest.skip(f"mount -t tmpfs as root failed: {res.stderr.strip()}")
        try:
            yield SmallFs(where, where, ())
        finally:
            _unmount(where)
        return
    unshare, nsenter = shutil.which("unshare"), shutil.which("nsenter")
    if unshare is None or nsenter is None:
        pytest.skip(
            "disk-full tests need a size-limited tmpfs: not root, and util-linux's "
            "unshare/nsenter are not installed for a user namespace"
        )
    holder = subprocess.Popen(
        [
            unshare,
            "--user",
            "--map-root-user",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs -o "size=$1,mode=0755" tmpfs "$2" && echo mounted && exec sleep 100000',
            "sh",
            size,
            str(where),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stderr is not None
        if holder.stdout.readline().strip() != "mounted":
            holder.wait(30)
            pytest.skip(
                "disk-full tests need a size-limited tmpfs: not root, and a user "
                f"namespace may not mount one here ({holder.stderr.read().strip()})"
            )
        view = Path(f"/proc/{holder.pid}/root") / where.relative_to("/")
        prefix = (
            nsenter,
            "--target",
            str(holder.pid),
            "--user",
            "--mount",
            "--preserve-credentials",
        )
        yield SmallFs(where, view, prefix)
    finally:
        holder.kill()
        holder.wait(30)


def _unmount(where: Path) -> None:
    res = _run(["umount", str(where)])
    if res.returncode != 0:  # busy (a leaked process): detach it now, freed when idle
        lazy = _run(["umount", "-l", str(where)])
        assert lazy.returncode == 0, f"could not unmount {where}: {res.stderr} {lazy.stderr}"


@contextlib.contextmanager
def read_only(where: Path) -> Iterator[None]:
    """Make the existing directory `where` and everything below it read-only for
    ckpt: a read-only bind mount as root (root ignores permissions), chmod a-w
    otherwise; undone afterwards."""
    if _as_root():
        res = _run(["mount", "--bind", str(where), str(where)])
        if res.returncode != 0:
            pytest.skip(f"mount --bind as root failed: {res.stderr.strip()}")
        try:
            ro = _run(["mount", "-o", "remount,bind,ro", str(where)])
            assert ro.returncode == 0, f"remount read-only failed: {ro.stderr}"
            yield
        finally:
            _unmount(where)
        return
    modes: dict[Path, int] = {}
    for p in [where, *where.rglob("*")]:
        st = p.lstat()
        if not stat.S_ISLNK(st.st_mode):
            modes[p] = stat.S_IMODE(st.st_mode)
    try:
        for p, mode in modes.items():
            p.chmod(mode & ~0o222)
        yield
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def writable_probe(where: Path) -> bool:
    """True if this process can create a file in `where` (the fault is real only if not)."""
    try:
        fd = os.open(where / ".probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return False
    os.close(fd)
    (where / ".probe").unlink()
    return True


# ---------------------------------------------------------------- running ckpt


def ckpt(
    args: list[str],
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
    timeout: float = RUN_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run the real binary to completion (inside a mount namespace with prefix)."""
    return subprocess.run(
        [*prefix, str(CKPT), *args],
        check=False,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        text=True,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def one_error(
    res: subprocess.CompletedProcess[str], *names: str, child_traceback: bool = False
) -> str:
    """The single `ckpt: error:` line of a failed command, which names every one
    of `names`; no crash (no traceback, unless the child printed one)."""
    errors = error_lines(res.stderr)
    assert len(errors) == 1, f"expected exactly one error line, got:\n{res.stderr}"
    line = errors[0]
    for name in names:
        assert name in line, f"the error does not name {name!r}: {line}"
    assert "unexpected error" not in res.stderr, res.stderr
    assert child_traceback or "Traceback" not in res.stderr, res.stderr
    return line


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ckpt: warning:")]


def tree(root: Path) -> dict[str, tuple[str, bytes | str]]:
    """Everything below root, not following links: path -> (kind, content)."""
    out: dict[str, tuple[str, bytes | str]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in [*dirnames, *filenames]:
            p = here / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", "")
            else:
                out[rel] = ("file", p.read_bytes())
    return out


def leftovers(parent: Path) -> list[str]:
    """ckpt's temp names beside a target dir (a restore that did not clean up)."""
    return sorted(p.name for p in parent.iterdir() if ".ckpt-" in p.name) if parent.is_dir() else []


# ---------------------------------------------------------------- a remote's objects


class Objects:
    """A remote's objects as bytes, read and written with fsspec directly (not
    through ckpt): for file:// a local directory, for s3:// the server itself."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(
            url, skip_instance_cache=True, **(storage_options or {})
        )
        self.root = root.rstrip("/")
        self.local = url.startswith("file://")
        #: How ckpt names this remote in its messages (a local one by its path).
        self.display = url.removeprefix("file://")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def names(self) -> list[str]:
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return []
        strip = self.root.lstrip("/") + "/"
        return sorted(n.lstrip("/")[len(strip) :] for n in found)

    def state(self) -> dict[str, str]:
        """key -> sha256 of its bytes: compare before and after a command."""
        return {k: hashlib.sha256(self.read(k)).hexdigest() for k in self.names()}

    def read(self, key: str) -> bytes:
        data: bytes = self.fs.cat_file(self._path(key))
        return data

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if self.local:  # object stores have no directories to make
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, data)
        self.fs.invalidate_cache()

    def delete(self, key: str) -> None:
        self.fs.rm_file(self._path(key))
        self.fs.invalidate_cache()

    def manifests(self) -> list[str]:
        """Snapshot manifest keys, oldest generation first."""
        return sorted(k for k in self.names() if k.startswith("snapshots/"))
