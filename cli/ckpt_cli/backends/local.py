"""The backend of a directory on a local (or network-mounted) filesystem:
the operating system's atomic rename and O_EXCL, no retries."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import stat
from pathlib import Path

from ckpt._fs import write_all
from ckpt_cli.backends import TEMP_RE as _TEMP_RE
from ckpt_cli.backends import NotFound
from ckpt_cli.errors import ConfigError, RemoteError


class LocalBackend:
    """A directory on a local (or network-mounted) filesystem.

    Modes: ckpt creates the root 0700; every directory and object below it
    is no wider than the root (a root made 0750 by its owner gets 0750 dirs
    and 0640 objects), and the umask narrows both further."""

    #: create_exclusive cannot race: the kernel refuses the second link.
    exclusive_create = True
    #: write() has written a view out when it returns: the caller may reuse it.
    borrows_buffers = True
    #: read_into reads the file straight into the view (no allocation per chunk).
    reads_into = True
    #: Objects are local files (a network mount's latency is the kernel's).
    local_io = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.display = str(root)
        self._root = str(root)
        #: Directories known to exist: not made again for every chunk.
        self._dirs: set[str] = set()
        #: Temp names: a random part per backend and a counter (one getrandom
        #: per process, not per write).
        self._tmp_prefix = secrets.token_hex(4)
        self._tmp_seq = itertools.count()
        #: (dir mode, object mode), from the root's mode once it exists.
        self._modes: tuple[int, int] | None = None

    def _root_modes(self) -> tuple[int, int]:
        """Make the root if missing (0700; its parents as mkdir -p does) and
        return the modes of what goes below it."""
        if self._modes is None:
            try:
                st = os.stat(self._root)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(self._root) or ".", exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self._root, 0o700)
                st = os.stat(self._root)
            if not stat.S_ISDIR(st.st_mode):  # bad input (78), as `ckpt ls` says it
                raise ConfigError(f"remote {self._root} is a file, not a directory (fix REMOTE)")
            root = st.st_mode & 0o777
            self._modes = (root | 0o700, root & 0o666 | 0o600)
        return self._modes

    def _makedirs(self, path: str) -> None:
        """Every missing directory from the root down to path, no wider than the root."""
        dir_mode, _ = self._root_modes()
        rel = os.path.relpath(path, self._root)
        here = self._root
        if rel != ".":
            for part in rel.split(os.sep):
                here = os.path.join(here, part)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(here, dir_mode)

    def _path(self, key: str) -> Path:
        return self.root / key

    def _tmp_for(self, path: str) -> str:
        """The temp name a write to path goes through (matches _TEMP_RE)."""
        parent, name = path.rsplit("/", 1)
        return f"{parent}/.{name}.tmp-{self._tmp_prefix}{next(self._tmp_seq):x}"

    def _open_object(self, key: str) -> int:
        """A read descriptor on the object at key. Only a regular file is an
        object: a directory, FIFO, socket or device where an object should be
        is NotFound (one planted in a repository must neither hang the
        reader, as opening a FIFO would, nor be read). O_NONBLOCK: opening a
        FIFO that appears between the check and the open does not block."""
        path = self._path(key)
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise NotFound(key)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(key) from None
        except OSError as exc:
            raise RemoteError(f"reading {key} from {self.display} failed: {exc}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotFound(key)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read(self, key: str) -> bytes:
        fd = self._open_object(key)
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read()
        except OSError as exc:
            raise RemoteError(f"reading {key} from {self.display} failed: {exc}") from None
        finally:
            os.close(fd)

    def read_into(self, key: str, view: memoryview) -> int:
        """Read the object into view; return the object's size (view holds its
        first len(view) bytes; a size that differs means the caller's view is
        not the whole object)."""
        fd = self._open_object(key)
        try:
            size = os.fstat(fd).st_size
            done = 0
            while done < min(size, len(view)):
                n = os.preadv(fd, [view[done:]], done)
                if n <= 0:
                    return done  # shrank while read: reported as that size
                done += n
            return size
        except OSError as exc:
            raise RemoteError(f"reading {key} from {self.display} failed: {exc}") from None
        finally:
            os.close(fd)

    def write(self, key: str, data: bytes | memoryview) -> None:
        """Whole or not at all (temp name, then rename). A memoryview is
        written out before this returns: the caller may reuse its buffer."""
        path = f"{self._root}/{key}"
        parent = path.rsplit("/", 1)[0]
        tmp = self._tmp_for(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            if parent not in self._dirs:
                self._makedirs(parent)
                self._dirs.add(parent)
            mode = self._root_modes()[1]
            try:
                fd = os.open(tmp, flags, mode)
            except FileNotFoundError:  # removed behind our back: make it again
                self._makedirs(parent)
                fd = os.open(tmp, flags, mode)
            try:
                write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise RemoteError(f"writing {key} to {self.display} failed: {exc}") from None

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write a temp object whole, then hard-link it to key (which fails if
        key exists): a full disk or a crash never leaves a half-written object
        under key. Filesystems without hard links get O_EXCL on key itself."""
        path = self._path(key)
        tmp = Path(self._tmp_for(str(path)))
        try:
            self._makedirs(str(path.parent))
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with os.fdopen(os.open(tmp, flags, self._root_modes()[1]), "wb") as f:
                f.write(data)
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.ENOSYS) or not tmp.exists():
                raise RemoteError(f"creating {key} on {self.display} failed: {exc}") from None
            return self._create_excl_in_place(key, path, data)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return True

    def _create_excl_in_place(self, key: str, path: Path, data: bytes) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self._root_modes()[1])
        except FileExistsError:
            return False
        except OSError as exc:
            raise RemoteError(f"creating {key} on {self.display} failed: {exc}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()  # ours: never leave it half-written
            raise RemoteError(f"creating {key} on {self.display} failed: {exc}") from None
        return True

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RemoteError(f"deleting {key} from {self.display} failed: {exc}") from None

    def rename(self, src: str, dst: str) -> None:
        path = f"{self._root}/{dst}"
        parent = path.rsplit("/", 1)[0]
        try:
            if parent not in self._dirs:
                self._makedirs(parent)
                self._dirs.add(parent)
            os.replace(f"{self._root}/{src}", path)
        except FileNotFoundError:
            if not os.path.exists(f"{self._root}/{src}"):
                raise NotFound(src) from None
            raise RemoteError(f"moving {src} to {dst} on {self.display} failed") from None
        except OSError as exc:
            raise RemoteError(f"moving {src} to {dst} on {self.display} failed: {exc}") from None

    def names(self) -> list[str]:
        root = self.root
        try:
            return [n for n in os.listdir(root) if not _TEMP_RE.match(n)]
        except FileNotFoundError:
            parent = root.parent
            if parent.is_dir():
                return []  # an empty repository: the first writer creates the directory
            raise RemoteError(
                f"remote {root} does not exist, nor does its parent directory {parent} "
                "(create it, or fix REMOTE)"
            ) from None
        except NotADirectoryError:
            raise ConfigError(f"remote {root} is a file, not a directory (fix REMOTE)") from None
        except OSError as exc:
            raise RemoteError(f"listing {root} failed: {exc.strerror or exc}") from None

    def list(self, prefix: str, *, temp: bool = False) -> list[str]:
        """Regular files only (an object is a file: a FIFO or a link planted
        in the store is no object), walked without recursion (os.walk of
        Python 3.11 recurses once per level: a planted tree 1,100 levels
        deep was a RecursionError)."""
        base = self._path(prefix)
        keys: list[str] = []
        stack = [(str(base), os.path.relpath(base, self.root))]
        while stack:
            directory, rel = stack.pop()
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            try:
                with os.scandir(directory) as it:
                    for e in it:
                        if e.is_dir(follow_symlinks=False):
                            stack.append((e.path, rel + e.name))
                        elif e.is_file(follow_symlinks=False) and (
                            bool(_TEMP_RE.match(e.name)) == temp
                        ):
                            keys.append(rel + e.name)
            except (FileNotFoundError, NotADirectoryError):
                continue  # nothing under prefix, or a directory removed meanwhile
            except OSError as exc:
                raise RemoteError(f"listing {prefix} on {self.display} failed: {exc}") from None
        return keys
