"""`ckpt gc`: keep the newest --keep restorable snapshots, delete the rest and
the chunks nothing kept names, under the writer lease (--dry-run: none).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli import console
from ckpt_cli.commands._shared import _emit_json, _names
from ckpt_cli.commands.where import reader
from ckpt_cli.errors import CkptError
from ckpt_cli.lease import DEFAULT_TTL, Heartbeat
from ckpt_cli.repo_tools import (
    open_existing,
)
from ckpt_cli.repository import Repository


@contextlib.contextmanager
def _writer_lease(repo: Repository, owner: str) -> Iterator[None]:
    """Hold the writer lease (as `ckpt push` does) with a heartbeat, so a long
    collection is never taken for a dead writer's; a lease lost meanwhile
    ends the command with LeaseLostError (69)."""
    lease = repo.lease(owner, ttl=DEFAULT_TTL)
    lease.acquire(on_wait=console.info)
    try:
        with Heartbeat(lease, on_error=console.warn) as beats:
            yield
            beats.check()
    finally:
        lease.release()


def gc(remote: str, keep: int, dry_run: bool, as_json: bool, options: dict[str, Any]) -> int:
    repo = open_existing(remote, options)
    if repo is None:
        if as_json:
            _emit_json(
                {
                    "remote": remote,
                    "dry_run": dry_run,
                    "keep": keep,
                    "kept": [],
                    "dropped": [],
                    "chunks": 0,
                    "bytes": 0,
                    "unsized_chunks": 0,
                    "temp_objects": 0,
                }
            )
        else:
            console.info(f"{remote} is empty: nothing to collect")
        return ExitCode.OK
    from ckpt_cli import world

    live = (
        world.live_ranks(repo, DEFAULT_TTL, wait=not dry_run, on_wait=console.info)
        if repo.rank_snapshots()
        else set()
    )
    if live and not dry_run:
        raise CkptError(
            f"ranks {', '.join(map(str, sorted(live)))} of a multi-node job hold their "
            f"leases on {repo.display}: their rank 0 prunes as it runs (--keep); run "
            "ckpt gc once the job has stopped",
            exit_code=ExitCode.UNAVAILABLE,
        )
    if dry_run:
        plan = world.collect(repo, keep, dry_run=True)
        if live:
            console.warn(
                f"ranks {', '.join(map(str, sorted(live)))} hold their leases: ckpt gc waits "
                "until the job has stopped; this is what it would do then"
            )
    else:
        with _writer_lease(repo, f"gc-{secrets.token_hex(4)}"):
            plan = world.collect(repo, keep, dry_run=False)
    deleted = len(plan.chunks)
    for ref in plan.damaged:
        console.warn(
            f"snapshot {ref.id} (generation {ref.generation}) does not read back whole (a chunk "
            f"it names is empty, short or corrupt): counted as damaged, so it displaces "
            f"nothing, and {'would be ' if dry_run else ''}marked suspect; `ckpt verify --full "
            f"{remote}` names what is wrong"
        )
    if as_json:
        _emit_json(
            {
                "remote": remote,
                "dry_run": dry_run,
                "keep": keep,
                "kept": [{"id": r.id, "generation": r.generation} for r in plan.kept],
                "dropped": [{"id": r.id, "generation": r.generation} for r in plan.dropped],
                "chunks": deleted,
                "bytes": plan.known_bytes,
                "unsized_chunks": plan.unsized,
                "temp_objects": len(plan.temps),
                "read_back_bytes": plan.audited,
                "damaged": [{"id": r.id, "generation": r.generation} for r in plan.damaged],
            }
        )
        return ExitCode.OK
    unsized = (
        f" + up to {console.fmt_bytes(plan.unsized * repo.chunk_size)} in "
        f"{console.plural(plan.unsized, 'chunk')} that no snapshot names"
        if plan.unsized
        else ""
    )
    dropped = f" ({_names(plan.dropped)})" if plan.dropped else ""
    drop, delete, free = (
        ("would drop", "delete", "free") if dry_run else ("dropped", "deleted", "freed")
    )
    console.info(
        f"{drop} {console.plural(len(plan.dropped), 'snapshot')}{dropped}, {delete} "
        f"{console.plural(deleted, 'chunk')} and {console.plural(len(plan.temps), 'temp object')}, "
        f"{free} {console.fmt_bytes(plan.known_bytes)}{unsized}; "
        f"{console.plural(len(plan.kept), 'snapshot')} kept in {remote}"
        + (
            f" (read back {console.fmt_bytes(plan.audited)} of those kept in place of others)"
            if plan.audited
            else ""
        )
    )
    return ExitCode.OK


def main(
    remote_arg: str | None,
    *,
    keep: int,
    dry_run: bool,
    json_out: bool,
    remote: str | None,
    dir: Path | None,
    storage_option: list[str] | None,
) -> int:
    """`ckpt gc [REMOTE] --keep N`."""
    where = reader("gc", remote_arg, remote, dir, storage_option)
    return gc(where.remote, keep, dry_run, json_out, where.storage_options)
