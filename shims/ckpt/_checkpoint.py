"""The Checkpoint object: read and write the checkpoint directory, commit it.

Covers Flyte's two intratask checkpoint APIs (flytekit: read/write bytes,
prev_exists; flyte 2.x: load/save of bytes, a file or a directory, sync and
async) on top of the directory the supervisor protects. Every save goes
through a temp name and a rename, then commits. Standard library only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import stat
import warnings
from pathlib import Path

from ckpt import _control, _preempt
from ckpt._contract import (
    ENV_ATTEMPT,
    ENV_DIR,
    ENV_RANK,
    ENV_RESTORED,
    ENV_RESTORED_STEP,
    ENV_WORLD_SIZE,
    TEMP_PATTERNS,
)
from ckpt._fs import (
    KEPT_PREFIX,
    SAVE_PREFIX,
    SPECIAL_BITS,
    cannot_swap,
    create_beside,
    existing_mode,
    move_in,
    swap_in,
    write_all,
)

#: The file that holds a bytes payload saved with write()/save(bytes).
PAYLOAD = "payload"

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def is_temp(name: str) -> bool:
    """A writer's temp name (one path component): never part of a checkpoint."""
    return any(fnmatch.fnmatchcase(name, p) for p in TEMP_PATTERNS)


class Checkpoint:
    """The checkpoint directory of this run (see `ckpt.checkpoint()`)."""

    def __init__(
        self,
        path: Path,
        attempt: int = 1,
        restored: str | None = None,
        restored_step: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.path = path
        self.attempt = attempt
        self.restored = restored
        #: The training step of the global generation restored (commit(step=)),
        #: None if what was restored carries no step or nothing was restored.
        self.restored_step = restored_step
        #: This node's rank of world_size (ckpt run --rank/--world-size).
        self.rank = rank
        self.world_size = world_size

    def __repr__(self) -> str:
        return (
            f"Checkpoint(path={str(self.path)!r}, attempt={self.attempt}, "
            f"restored={self.restored!r}, restored_step={self.restored_step!r}, "
            f"rank={self.rank}, world_size={self.world_size})"
        )

    # -- state

    def prev_exists(self) -> bool:
        """True if the directory holds anything from an earlier attempt or run."""
        try:
            return any(not is_temp(p.name) for p in self.path.iterdir())
        except FileNotFoundError:
            return False

    # -- flytekit style

    def read(self) -> bytes | None:
        """The bytes last saved with write()/save(bytes), or None."""
        try:
            return (self.path / PAYLOAD).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, data: bytes) -> str | None:
        """Save bytes atomically and commit them (same as save_sync(bytes));
        returns the snapshot id (None outside `ckpt run`)."""
        return self.save_sync(data)

    # -- flyte 2.x style

    def load_sync(self) -> Path | None:
        """The payload file if bytes were saved, else the directory if it holds
        anything, else None."""
        payload = self.path / PAYLOAD
        if payload.is_file():
            return payload
        return self.path if self.prev_exists() else None

    def save_sync(
        self, data: bytes | bytearray | memoryview | str | os.PathLike[str]
    ) -> str | None:
        """Save and commit. bytes -> the payload file; a file path -> copied in
        under its name; a directory -> replaces the whole checkpoint contents.
        Returns the id of the durable snapshot (None outside `ckpt run`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes | bytearray | memoryview):
            _atomic_write(self.path / PAYLOAD, bytes(data))
        else:
            source = Path(data)
            if source.is_dir():
                _replace_tree(source, self.path)
            elif source.is_file():
                _atomic_copy(source, self.path / source.name)
            else:
                raise FileNotFoundError(f"nothing to save at {source}")
        return self.commit()

    async def load(self) -> Path | None:
        import asyncio  # here: asyncio (with ssl, socket) costs every `import ckpt` 40 ms

        return await asyncio.to_thread(self.load_sync)

    async def save(
        self, data: bytes | bytearray | memoryview | str | os.PathLike[str]
    ) -> str | None:
        import asyncio

        return await asyncio.to_thread(self.save_sync, data)

    # -- commit

    def commit(
        self, wait: bool = True, timeout: float | None = None, step: int | None = None
    ) -> str | None:
        """Ask the supervisor for a snapshot of the directory as it is now.

        step: the training step this checkpoint is of. On several nodes, the
        newest step every rank has committed is what each rank restores (a
        consistent cut); on one node it is recorded and shown by `ckpt ls`.

        wait=True returns the snapshot id once it is durable in the remote;
        wait=False returns once the content is pinned (later writes through
        temp + rename do not change it) and the files changed since the last
        snapshot passed their format checks. Raises CommitError with the
        reason, e.g. "model.pt fails the zip check: ...", either way.
        Outside `ckpt run` it is a no-op returning None (one warning)."""
        if step is not None and (
            isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 1 << 62
        ):
            raise ValueError(f"step must be a whole number from 0 to {(1 << 62) - 1}, not {step!r}")
        if _control.socket_path() is None:
            _warn_once("commit", "ckpt: not running under `ckpt run`: commit() only saves locally")
            return None
        limit = None if timeout is None else timeout + 10.0
        message: dict[str, object] = {"op": "commit", "wait": wait, "timeout": timeout}
        if step is not None:
            message["step"] = step
        reply = _control.request(message, limit)
        if not reply.get("ok"):
            raise _control.CommitError(str(reply.get("error", "unknown error")))
        snapshot = reply.get("snapshot")
        return str(snapshot) if snapshot else None


_default: Checkpoint | None = None


def checkpoint() -> Checkpoint:
    """The checkpoint of this process: $CKPT_DIR under `ckpt run`; outside it,
    $CKPT_DIR if set, else ./checkpoints (with one warning)."""
    global _default
    if _default is None:
        raw = os.environ.get(ENV_DIR)
        if not raw:
            _warn_once(
                "dir",
                "ckpt: not running under `ckpt run`: using ./checkpoints, "
                "no remote copy and no retries",
            )
            raw = "checkpoints"
        try:
            attempt = int(os.environ.get(ENV_ATTEMPT) or 1)
        except ValueError:
            attempt = 1
        _default = Checkpoint(
            Path(raw).absolute(),
            attempt,
            os.environ.get(ENV_RESTORED) or None,
            _env_int(ENV_RESTORED_STEP),
            _env_int(ENV_RANK) or 0,
            _env_int(ENV_WORLD_SIZE) or 1,
        )
        _preempt.install()
    return _default


def _env_int(name: str) -> int | None:
    try:
        return int(os.environ.get(name) or "")
    except ValueError:
        return None


def commit(wait: bool = True, timeout: float | None = None, step: int | None = None) -> str | None:
    """checkpoint().commit(...)"""
    return checkpoint().commit(wait=wait, timeout=timeout, step=step)


# ---------------------------------------------------------------- latest


_NUMBER = re.compile(r"(\d+)")
#: Directories a framework writes whose completion is marked by a file inside.
_MARKERS = ((re.compile(r"^checkpoint-\d+$"), "trainer_state.json"),)  # HF Trainer


def _complete(p: Path) -> bool:
    if is_temp(p.name):
        return False
    try:
        if p.is_symlink() and not p.exists():
            return False
        if p.is_file():
            return p.stat().st_size > 0
        if p.is_dir():
            for pattern, marker in _MARKERS:
                if pattern.match(p.name):
                    return _parses(p / marker)
            return any(True for _ in p.iterdir())
    except OSError:
        return False
    return False


def _parses(marker: Path) -> bool:
    """The completion marker exists and is whole JSON (HF writes it in place)."""
    try:
        json.loads(marker.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return True


def latest_checkpoint(
    root: str | os.PathLike[str] | None = None, pattern: str = "*"
) -> Path | None:
    """The newest complete entry of `root` (default: the checkpoint dir) matching
    `pattern`. Newest = highest number in the name when every candidate has
    one (epoch-12 > epoch-9), else the latest mtime. Temp names, empty files
    and framework dirs without their completion marker are never returned."""
    base = Path(root) if root is not None else checkpoint().path
    candidates = [p for p in base.glob(pattern) if _complete(p)]
    if not candidates:
        return None
    numbers = {p: [int(n) for n in _NUMBER.findall(p.name)] for p in candidates}
    if all(numbers.values()):
        return max(candidates, key=lambda p: (numbers[p][::-1], p.name))
    return max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name))


# ---------------------------------------------------------------- atomic writes


def _temp_beside(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.urandom(4).hex()}.tmp")


def _atomic_write(target: Path, data: bytes) -> None:
    """Write a temp name (never through a link), then rename it over target;
    an existing target's mode is kept."""
    tmp = _temp_beside(target)
    try:
        fd = create_beside(tmp, target)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _atomic_copy(source: Path, target: Path) -> None:
    """Copy source's bytes and mtime to a temp name, then rename it over
    target. An existing target's mode is kept; a new one gets source's
    mode without setuid, setgid and sticky."""
    tmp = _temp_beside(target)
    mode = existing_mode(target)
    try:
        with open(source, "rb") as src, os.fdopen(create_beside(tmp, target), "wb") as f:
            shutil.copyfileobj(src, f)
            st = os.fstat(src.fileno())
            if mode is None:
                os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode) & ~SPECIAL_BITS)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _keep_kept(old: Path, target: Path) -> None:
    """ckpt's kept dirs (what a restore or a repair moved aside, which may
    hold the only copy of a file) are never part of what a save replaces:
    from the old directory into the new one before the old one goes."""
    for name in sorted(os.listdir(old)):
        if name.startswith(KEPT_PREFIX) and not os.path.lexists(target / name):
            with contextlib.suppress(OSError):
                os.rename(old / name, target / name)


def _replace_tree(source: Path, target: Path) -> None:
    """Make target's contents a copy of source: in one rename, or, where
    target cannot be swapped (a mount point, a read-only parent), copied in
    beside its entries and moved in under a marker (the supervisor's next
    start finishes a move that was cut short). Target keeps its own mode."""
    why = cannot_swap(target)
    token = os.urandom(4).hex()
    inside, beside = target / f"{SAVE_PREFIX}{token}", f".{target.name}{SAVE_PREFIX}{token}"
    tmp = inside if why else target.with_name(beside)
    shutil.copytree(source, tmp, symlinks=True)
    try:
        mode = existing_mode(target)
        os.chmod(tmp, 0o700 if mode is None else mode)
        if why:
            holding = target / f"{KEPT_PREFIX}save-{token}"
            holding.mkdir(mode=0o700)
            move_in(tmp, target, holding)
            shutil.rmtree(holding, ignore_errors=True)  # replaced on the caller's request
        else:
            old = swap_in(tmp, target)
            if old is not None:
                _keep_kept(old, target)
                shutil.rmtree(old, ignore_errors=True)  # replaced on the caller's request
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
