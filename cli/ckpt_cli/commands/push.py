"""`ckpt push`: one snapshot of DIR now (the code path of `ckpt run`), then
retention by --keep, under the writer lease.

A push is the whole directory, whole, or nothing (docs/consistency.md): the
files that changed are checked as `ckpt run` checks them (the built-in
format checks and --check), and one that is not whole refuses the push as a
commit is refused (65); a file that changes while it is read is read again,
PUSH_TRIES times in all, then refuses it too. Nothing is written then, so
nothing whole is displaced or pruned.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt._contract import ExitCode
from ckpt_cli import config, console
from ckpt_cli.backends import open_backend
from ckpt_cli.commands.where import locate, place
from ckpt_cli.errors import CkptError, ConfigError
from ckpt_cli.formats import Registry
from ckpt_cli.lease import DEFAULT_TTL, Heartbeat
from ckpt_cli.manifest import Manifest
from ckpt_cli.repository import (
    Repository,
    newest_manifest,
)

if TYPE_CHECKING:
    from ckpt_cli.snapshotter import Listing, SnapshotResult, Snapshotter

#: Reads of the directory a push makes at most while files change under it.
PUSH_TRIES = 3


def _open(remote: str, options: dict[str, Any], *, create: bool) -> Repository | None:
    if create:
        config.private_store_dirs(remote)
    backend = open_backend(remote, options)
    return Repository.open(backend, create=create)


@contextlib.contextmanager
def _watching(snapshotter: Any, bar: console.Progress) -> Iterator[None]:
    """Feed the bar from the snapshot under way (bytes read and uploaded)."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.1):
            live = snapshotter.live
            if live is not None:
                result, _files, total, _started = live
                bar.update(result.bytes_read, total)

    t = threading.Thread(target=poll, name="ckpt-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def push(
    dir: Path,
    remote: str,
    keep: int,
    options: dict[str, Any],
    *,
    allow_empty: bool = False,
    checks: Registry | None = None,
    excludes: tuple[str, ...] = (),
) -> int:
    """checks: the format checks in force (default: the built-in ones);
    excludes: names never snapshotted, on top of temp names (run's --exclude)."""
    from ckpt_cli.kept import recover_interrupted
    from ckpt_cli.snapshotter import TEMP_PATTERNS, Snapshotter, UnreadableError

    source = config.resolve_dir(dir)
    if not source.is_dir():
        raise ConfigError(f"{source} is not a directory (ckpt push [DIR] [REMOTE], or --dir)")
    config.check_remote_outside(source, remote)
    config.check_lasting(remote, "ckpt push")
    recover_interrupted(source)  # a restore killed half-way is finished first
    repo = _open(remote, options, create=True)
    assert repo is not None
    lease = repo.lease(f"push-{secrets.token_hex(4)}", ttl=DEFAULT_TTL)
    lease.acquire(on_wait=console.info)
    beats = Heartbeat(lease, on_error=console.warn)  # a long push is not a dead one
    snapshotter = Snapshotter(
        repo,
        source,
        run="push",
        patterns=(*TEMP_PATTERNS, *excludes),
        may_write=beats.check,
        checks=checks if checks is not None else Registry(),
    )
    try:
        with beats:
            newest = newest_manifest(repo)
            if not allow_empty:
                refuse_empty_push(snapshotter, newest, source, repo)
            listing = snapshotter.list_root()  # one walk for the adoption and the first try
            snapshotter.adopt(newest, trust_local=False, listing=listing)
            with console.Progress(f"pushing {source}") as bar, _watching(snapshotter, bar):
                result = _take(snapshotter, keep, source, listing)
    except UnreadableError as exc:  # a push is the whole directory or nothing
        raise ConfigError(
            f"cannot read {exc.path} in {source} ({exc.reason}): nothing pushed; make it "
            "readable by ckpt, or move it out of the directory"
        ) from None
    finally:
        snapshotter.close()
        lease.release()
    if result.skipped_links:
        console.warn(
            "symlinks that lead out of the directory are not snapshotted: "
            + ", ".join(result.skipped_links[:5])
        )
    m = result.manifest
    if m is None:
        held = result.parent.id if result.parent else "none"
        console.info(f"nothing changed since snapshot {held}")
        return ExitCode.OK
    console.info(
        f"pushed snapshot {m.id} (generation {m.generation}): "
        f"{console.plural(len(m.files), 'file')}, "
        f"{console.fmt_bytes(m.total_size)}, {console.fmt_bytes(result.new_bytes)} new, "
        f"{result.seconds:.1f}s"
    )
    return ExitCode.OK


def _take(
    snapshotter: Snapshotter, keep: int, source: Path, listing: Listing | None = None
) -> SnapshotResult:
    """The push's snapshot: files that changed while read are read again
    (only they: the rest is in the stat cache), PUSH_TRIES times in all; the
    first try takes `listing`, the others scan again.
    CkptError (65) when a file is not whole or keeps changing; nothing is
    written then."""
    from ckpt_cli.snapshotter import ChangedWhileReadError

    changed: list[str] = []
    for _ in range(PUSH_TRIES):
        try:
            result = snapshotter.snapshot(reason="push", keep=keep, strict=True, listing=listing)
        except ChangedWhileReadError as exc:
            changed = exc.paths
            listing = None
            continue
        if result.waiting:
            raise not_whole(result.waiting, source)
        return result
    raise CkptError(
        f"{_some(changed)} in {source} changed while being read, {PUSH_TRIES} times: "
        "nothing pushed; push again once it is written (a writer that writes a temp "
        "name and renames it is never read half-way)",
        exit_code=ExitCode.DAMAGED,
    )


def not_whole(waiting: dict[str, str], source: Path) -> CkptError:
    """A push refused for files that fail their check, as a commit is (65)."""
    path = min(waiting)
    more = f" (and {console.plural(len(waiting) - 1, 'other')})" if len(waiting) > 1 else ""
    return CkptError(
        f"{path} in {source} {waiting[path]}{more}: nothing pushed; push once the save "
        "is finished, or pass --no-format-checks to push it as it is",
        exit_code=ExitCode.DAMAGED,
    )


def _some(paths: list[str]) -> str:
    return ", ".join(paths[:3]) + (f" (and {len(paths) - 3} more)" if len(paths) > 3 else "")


def refuse_empty_push(
    snapshotter: Snapshotter, newest: Manifest | None, source: Path, repo: Repository
) -> None:
    """An empty DIR over a history with data would become the newest snapshot,
    what every restore picks (retention keeps the ones with data: an empty
    snapshot never counts toward --keep)."""
    from ckpt_cli.dirscan import holds_a_file

    if newest is None or all(e.type == "dir" for e in newest.entries):
        return
    try:
        found = holds_a_file(snapshotter.root, snapshotter.patterns)
    except OSError:
        found = None  # the scan names what cannot be read
    if found is None:
        found = any(e.type != "dir" for e in snapshotter.scan_root())
    if found:
        return
    raise ConfigError(
        f"{source} is empty and the newest snapshot of {repo.display}, {newest.id}, holds "
        f"{console.plural(len(newest.files), 'file')}: pushing it would make an empty snapshot "
        "the one every restore picks (the snapshots with files stay); pass --allow-empty if "
        "that is what you want"
    )


def main(
    args: list[str] | None,
    *,
    remote: str | None,
    dir: Path | None,
    keep: int | None,
    storage_option: list[str] | None,
    allow_empty: bool,
    check: list[str] | None = None,
    check_timeout: float | None = None,
    no_format_checks: bool = False,
    exclude: list[str] | None = None,
) -> int:
    """`ckpt push [DIR] [REMOTE]`. The checks and the excludes are `ckpt
    run`'s: --check, --check-timeout, --no-format-checks and --exclude, from
    the same sources."""
    placed = place("push", ("dir", "remote"), args, taken={"dir": dir, "remote": remote})
    where = locate(
        {
            "dir": placed.get("dir", dir),
            "remote": placed.get("remote", remote),
            "storage_option": storage_option,
            "keep": keep,
            "check": check,
            "check_timeout": check_timeout,
            "no_format_checks": no_format_checks or None,
            "exclude": exclude,
        },
        writer=True,
        names=("keep", "check", "check_timeout", "no_format_checks", "exclude"),
    )
    settings = where.settings
    checks = Registry(config.command_checks(settings), builtin=not settings["no_format_checks"])
    return push(
        where.dir,
        where.remote,
        settings["keep"],
        where.storage_options,
        allow_empty=allow_empty,
        checks=checks,
        excludes=tuple(settings["exclude"]),
    )
