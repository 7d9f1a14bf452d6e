"""`ckpt restore`: a snapshot into DIR, verified, swapped in atomically; a
rank's files of the newest step all ranks committed with --rank and --world-size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli import config, console
from ckpt_cli.commands.where import locate, place
from ckpt_cli.errors import ConfigError, RestoreError
from ckpt_cli.repo_tools import open_existing
from ckpt_cli.repository import Repository, SnapshotRef, rank_stream


def _has_entries(directory: Path) -> bool:
    """Anything of the user's: a fresh volume's lost+found and ckpt's own
    .ckpt-* names (kept dirs of earlier restores) do not count."""
    from ckpt._fs import LOST_FOUND, is_reserved

    try:
        return directory.is_dir() and any(
            not is_reserved(p.name) and p.name != LOST_FOUND for p in directory.iterdir()
        )
    except OSError:
        return False  # unreadable: the restore itself says what is wrong


def _rank_part(
    repo: Repository, rank: int, world_size: int, allow_world_change: bool
) -> tuple[bool, SnapshotRef | None]:
    """Whether this rank restores anything (world.choose, said on the
    console), and the part it restores (None: the stream's own newest)."""
    from ckpt_cli import world

    choice = world.choose(repo, rank, world_size, allow_change=allow_world_change)
    if choice is None:
        return True, None
    if not choice.consistent:
        console.warn(choice.note)
    if choice.manifest is None:
        console.info(f"{choice.note}: nothing restored")
        return False, None
    if choice.ref is not None:
        console.info(f"rank {rank}: {choice.note}")
    return True, choice.ref


def restore(
    remote: str,
    dir: Path,
    snapshot: str | None,
    options: dict[str, Any],
    *,
    force: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    allow_world_change: bool = False,
) -> int:
    from ckpt_cli.restore import MAX_PASSED_OVER, PartDamaged, pass_over
    from ckpt_cli.restore import restore as do_restore

    target = config.resolve_dir(dir)
    config.check_remote_outside(target, remote)
    repo = open_existing(remote, options)
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ConfigError("--rank and --world-size go together (restore a rank's files)")
        if rank >= world_size:
            raise ConfigError(f"--rank {rank} is outside --world-size {world_size}")
    ref = None
    if repo is not None and rank is not None and world_size is not None:
        repo = repo.for_stream(rank_stream(rank, world_size))
        if snapshot is None:
            wanted, ref = _rank_part(repo, rank, world_size, allow_world_change)
            if not wanted:
                return ExitCode.OK
    if repo is None:
        if snapshot is not None:
            raise ConfigError(f"no snapshot {snapshot!r} in {remote}: it is empty (--snapshot)")
        console.info(f"{remote} is empty: no snapshots yet, nothing restored")
        return ExitCode.OK
    if not force and _has_entries(target) and repo.snapshots():
        raise ConfigError(
            f"{target} is not empty: pass --force to replace its contents with the snapshot "
            "(they stay as they are until the whole snapshot is in place; files in no "
            "restorable snapshot are then moved aside, never deleted)"
        )
    with console.Progress(f"restoring into {target}") as bar:
        for _ in range(MAX_PASSED_OVER):
            try:
                done = do_restore(
                    repo, target, snapshot=snapshot, warn=console.warn, progress=bar.update, ref=ref
                )
                break
            except PartDamaged as exc:
                if rank is None or world_size is None:
                    raise  # only a rank's part of a step is restored by ref
                # Every rank goes back to the step before it, this one first.
                pass_over(repo, exc, rank, console.warn)
                wanted, ref = _rank_part(repo, rank, world_size, allow_world_change)
                if not wanted:
                    return ExitCode.OK
        else:
            raise RestoreError(
                f"rank {rank}: {MAX_PASSED_OVER} damaged snapshots passed over, none restored; "
                f"{target} is untouched (`ckpt verify {remote}` lists what is wrong)"
            )
    if done is None:
        console.info(f"{remote} has no snapshots yet: nothing restored")
        return ExitCode.OK
    m = done.manifest
    step = "" if m.step is None else f", step {m.step}"
    console.info(
        f"restored snapshot {m.id} (generation {m.generation}{step}, "
        f"{console.plural(len(m.files), 'file')}, "
        f"{console.fmt_bytes(m.total_size)}) into {target} in {done.seconds:.1f}s"
    )
    return ExitCode.OK


def main(
    args: list[str] | None,
    *,
    remote: str | None,
    dir: Path | None,
    snapshot: str | None,
    force: bool,
    storage_option: list[str] | None,
    rank: int | None,
    world_size: int | None,
    allow_world_change: bool,
) -> int:
    """`ckpt restore [REMOTE] [DIR]`."""
    placed = place("restore", ("remote", "dir"), args, taken={"remote": remote, "dir": dir})
    where = locate(
        {
            "remote": placed.get("remote", remote),
            "dir": placed.get("dir", dir),
            "storage_option": storage_option,
        }
    )
    return restore(
        where.remote,
        where.dir,
        snapshot,
        where.storage_options,
        force=force,
        rank=rank,
        world_size=world_size,
        allow_world_change=allow_world_change,
    )
