"""A recording backend for one collection (`ckpt gc`): restic's dry-run is a
wrapper around the backend, and so is this one.

"""

from __future__ import annotations

from ckpt_cli.backends import Backend, NotFound, read_whole_into


class Recorder:
    """A backend for one collection (`ckpt gc`): reads pass through; every
    delete of an object that exists is recorded (`deleted`), as is every key
    a listing of temp names returned (`temps`). With dry_run it deletes,
    renames and writes nothing, and shows the code after them the store as
    if it had (an overlay): a dry run goes through the very code of the real
    one and records what that would delete."""

    #: Nothing asked of it but reads, deletes and listings: the plain paths
    #: (read_into passes through to a backend that reads into a view).
    exclusive_create = False
    borrows_buffers = False
    local_io = False

    def __init__(self, backend: Backend, *, dry_run: bool) -> None:
        self.inner = backend
        self.display = backend.display
        self.dry_run = dry_run
        self.deleted: list[str] = []
        self.temps: set[str] = set()
        #: Keys gone (deleted or moved away), and keys that appeared: the
        #: bytes written, or the key whose object was moved here.
        self._gone: set[str] = set()
        self._new: dict[str, bytes | str] = {}
        #: One listing per top-level prefix, for whether an object exists.
        self._listed: dict[str, set[str]] = {}

    def _exists(self, key: str) -> bool:
        if key in self._new:
            return True
        if key in self._gone:
            return False
        if key in self.temps:  # hidden from a plain listing
            return True
        top = key.split("/", 1)[0] + "/" if "/" in key else ""
        if top not in self._listed:
            self._listed[top] = set(self.inner.list(top))
        return key in self._listed[top]

    def read(self, key: str) -> bytes:
        new = self._new.get(key)
        if new is not None:
            return new if isinstance(new, bytes) else self.inner.read(new)
        if key in self._gone:
            raise NotFound(key)
        return self.inner.read(key)

    @property
    def reads_into(self) -> bool:
        """Chunks read back by `ckpt gc` go straight into their buffer, never
        more than it in memory (a planted object may be of any size)."""
        return bool(self.inner.reads_into)

    def read_into(self, key: str, view: memoryview) -> int:
        if key in self._new or key in self._gone or not self.inner.reads_into:
            return read_whole_into(self, key, view)
        return self.inner.read_into(key, view)

    def write(self, key: str, data: bytes) -> None:
        if not self.dry_run:
            self.inner.write(key, data)
        self._new[key] = bytes(data)
        self._gone.discard(key)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        if not self.dry_run:
            return self.inner.create_exclusive(key, data)
        if self._exists(key):
            return False
        self.write(key, data)
        return True

    def delete(self, key: str) -> None:
        if self._exists(key):
            self.deleted.append(key)
        if not self.dry_run:
            self.inner.delete(key)
        self._new.pop(key, None)
        self._gone.add(key)

    def rename(self, src: str, dst: str) -> None:
        if not self.dry_run:
            self.inner.rename(src, dst)
            self._new.pop(src, None)
            self._new[dst] = dst  # there now: read it there
        elif not self._exists(src):
            raise NotFound(src)
        else:
            self._new[dst] = self._new.pop(src, src)
        self._gone.add(src)
        self._gone.discard(dst)

    def names(self) -> list[str]:
        return self.inner.names()

    def list(self, prefix: str, *, temp: bool = False) -> list[str]:
        keys = self.inner.list(prefix, temp=temp)
        if self.dry_run:
            keys = [k for k in keys if k not in self._gone]
            if not temp:
                seen = set(keys)
                keys += [k for k in self._new if k.startswith(prefix) and k not in seen]
        if temp:
            self.temps.update(keys)
        return keys
