"""The commands that look after a repository: show (the files of a snapshot),
diff (two snapshots), verify (every manifest and chunk), gc (prune and
collect, under the writer lease). Each returns an exit status; tables and
--json go to stdout, ckpt's own lines through `console`.

"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli import console
from ckpt_cli.errors import CkptError, ConfigError
from ckpt_cli.lease import DEFAULT_TTL, Heartbeat
from ckpt_cli.manifest import Entry, Manifest
from ckpt_cli.repo_tools import (
    DamagedError,
    check,
    entry_json,
    find,
    load,
    open_existing,
)
from ckpt_cli.repo_tools import diff as diff_manifests
from ckpt_cli.repository import Repository, SnapshotRef

#: Ids named in one line before "and N more (--json for all)".
NAMED = 10


def _emit_json(doc: dict[str, Any]) -> None:
    console.document(doc)


def _names(refs: list[SnapshotRef]) -> str:
    shown = ", ".join(f"{r.id} ({r.generation})" for r in refs[:NAMED])
    more = f" and {len(refs) - NAMED} more (--json for all)" if len(refs) > NAMED else ""
    return shown + more


def _clock(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# ---------------------------------------------------------------- show, diff


def _meta(m: Manifest) -> dict[str, Any]:
    return {
        "id": m.id,
        "generation": m.generation,
        "created": m.created,
        "parent": m.parent,
        "host": m.host,
        "run": m.run,
        "attempt": m.attempt,
        "reason": m.reason,
        "files": len(m.files),
        "size": m.total_size,
        "new_bytes": m.new_bytes,
        "verified": m.verified,
        "unverified": [{"path": p, "reason": why} for p, why in m.unverified],
    }


def _require(repo: Repository | None, remote: str, wanted: str) -> Repository:
    if repo is None:
        raise ConfigError(f"no snapshot {wanted!r} in {remote}: it is empty (see `ckpt ls`)")
    return repo


def show(remote: str, snapshot: str | None, as_json: bool, options: dict[str, Any]) -> int:
    repo = open_existing(remote, options)
    if snapshot is not None:
        repo = _require(repo, remote, snapshot)
        ref = find(repo, snapshot)
        m = load(repo, ref)
    else:
        refs = repo.snapshots() if repo is not None else []
        if repo is None or not refs:
            if as_json:
                _emit_json({"remote": remote, "snapshot": None, "entries": []})
            else:
                console.info(f"{remote} is empty: no snapshots yet")
            return ExitCode.OK
        ref, m = _newest_readable(repo, refs)
    mark = repo.read_suspect(ref.key)
    if as_json:
        meta = {**_meta(m), "suspect": mark.to_json() if mark is not None else None}
        _emit_json({"remote": remote, "snapshot": meta, "entries": _entries_json(m)})
        return ExitCode.OK
    checks = {True: "verified", False: "unverified", None: "taken before ckpt checked files"}
    console.info(
        f"snapshot {m.id} (generation {m.generation}) of {remote}: "
        f"{console.plural(len(m.files), 'file')}, {console.fmt_bytes(m.total_size)}, "
        f"taken {_clock(m.created)} on {m.host or '?'}, attempt {m.attempt or '-'}; "
        f"{checks[m.verified]}"
    )
    for path, why in m.unverified:
        console.warn(f"{path} was in progress when this snapshot was taken: {why}")
    if mark is not None:
        console.warn(
            f"marked suspect: {mark.why} (`ckpt unsuspect {remote} {m.id}` clears the mark)"
        )
    _entries_table(m.entries)
    return ExitCode.OK


def _newest_readable(repo: Repository, refs: list[SnapshotRef]) -> tuple[SnapshotRef, Manifest]:
    for ref in refs:
        try:
            m = load(repo, ref)
        except DamagedError as exc:
            console.warn(f"{exc}; showing an older one")
            continue
        return ref, m
    raise DamagedError(
        f"none of the {console.plural(len(refs), 'snapshot')} in {repo.display} has a readable "
        "manifest "
        f"(see `ckpt verify {repo.display}`)"
    )


def _entries_json(m: Manifest) -> list[dict[str, Any]]:
    return [entry_json(e) for e in m.entries]


def _entries_table(entries: tuple[Entry, ...]) -> None:
    table: list[list[str]] = []
    for e in entries:
        if e.type == "symlink":
            table.append([f"{e.path} -> {e.target}", "symlink", f"{e.mode:04o}", "", "", "", ""])
        elif e.type == "dir":
            modified = _clock(e.mtime_ns / 1e9)
            table.append([f"{e.path}/", "dir", f"{e.mode:04o}", "", "", modified, e.check])
        else:
            table.append(
                [
                    e.path,
                    "file",
                    f"{e.mode:04o}",
                    console.fmt_bytes(e.size),
                    str(len(e.chunks)),
                    _clock(e.mtime_ns / 1e9),
                    e.check,
                ]
            )
    cols = ("path", "type", "mode", "size", "chunks", "modified", "check")
    console.table(cols, table, right=("size", "chunks"))


def diff(remote: str, a: str, b: str, as_json: bool, options: dict[str, Any]) -> int:
    repo = _require(open_existing(remote, options), remote, a)
    ma, mb = load(repo, find(repo, a)), load(repo, find(repo, b))
    d = diff_manifests(ma, mb)
    if as_json:
        _emit_json(
            {
                "remote": remote,
                "from": _meta(ma),
                "to": _meta(mb),
                "added": [entry_json(e) for e in d.added],
                "removed": [entry_json(e) for e in d.removed],
                "changed": [
                    {
                        "path": c.after.path,
                        "what": c.what,
                        "before": entry_json(c.before),
                        "after": entry_json(c.after),
                    }
                    for c in d.changed
                ],
            }
        )
        return ExitCode.OK
    console.info(
        f"{ma.id} (generation {ma.generation}) -> {mb.id} (generation {mb.generation}): "
        + (
            "no differences"
            if d.empty
            else f"{len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed"
        )
    )
    if d.empty:
        return ExitCode.OK
    table = [["+", e.path, _describe(e)] for e in d.added]
    table += [["-", e.path, _describe(e)] for e in d.removed]
    table += [["~", c.after.path, _describe_change(c.before, c.after, c.what)] for c in d.changed]
    console.table(("", "", ""), table, header=False)
    return ExitCode.OK


def _describe(e: Entry) -> str:
    if e.type == "file":
        return f"file, {console.fmt_bytes(e.size)}"
    return f"symlink -> {e.target}" if e.type == "symlink" else "dir"


def _describe_change(x: Entry, y: Entry, what: list[str]) -> str:
    parts = []
    for w in what:
        if w == "type":
            parts.append(f"{x.type} -> {y.type}")
        elif w == "content":
            parts.append("content")
        elif w == "size":
            parts.append(f"size {console.fmt_bytes(x.size)} -> {console.fmt_bytes(y.size)}")
        elif w == "mode":
            parts.append(f"mode {x.mode:04o} -> {y.mode:04o}")
        else:
            parts.append(f"target {x.target} -> {y.target}")
    return ", ".join(parts)


# ---------------------------------------------------------------- verify, gc


def verify(
    remote: str, snapshot: str | None, full: bool, as_json: bool, options: dict[str, Any]
) -> int:
    repo = open_existing(remote, options)
    if repo is None:
        if snapshot is not None:
            _require(repo, remote, snapshot)
        if as_json:
            _emit_json({"remote": remote, "ok": True, "full": full, "snapshots": []})
        else:
            console.info(f"{remote} is empty: no snapshots yet, nothing to verify")
        return ExitCode.OK
    refs = [find(repo, snapshot)] if snapshot is not None else repo.all_snapshots()

    def started(chunks: int, size: int) -> None:
        console.info(f"re-hashing {console.plural(chunks, 'chunk')} ({console.fmt_bytes(size)})")

    checks = check(repo, refs, full=full, formats=True, on_start=started)
    damaged = checks.damaged
    if as_json:
        doc: dict[str, Any] = {
            "remote": remote,
            "ok": not damaged,
            "full": full,
            "snapshots": [
                {
                    "id": c.ref.id,
                    "generation": c.ref.generation,
                    "ok": c.ok,
                    "problems": [p.to_json() for p in c.problems],
                }
                for c in checks.snapshots
            ],
            "chunks": {
                "listed": checks.chunks_listed,
                "referenced": checks.chunks_referenced,
                "hashed": checks.chunks_hashed,
                "bytes_hashed": checks.bytes_hashed,
                "read_for_format_checks": checks.chunks_read,
            },
            "files_checked": checks.files_checked,
        }
        _emit_json(doc)
    elif damaged:
        rows = [[c.ref.id, str(c.ref.generation), c.summary()] for c in damaged]
        console.table(("id", "gen", "problem"), rows, right=("gen",))
    checked = console.plural(len(checks.snapshots), "snapshot")
    if damaged:
        torn = [c for c in damaged if all(p.kind == "format" for p in c.problems)]
        hints = []
        if len(torn) < len(damaged):
            hints.append("`ckpt restore` and `ckpt run` skip those with missing or corrupt data")
        if torn:
            hints.append(
                f"{_names([c.ref for c in torn])} hold files that fail their format check "
                "(a restore gives them back as stored: restore another with --snapshot ID)"
            )
        raise DamagedError(
            f"{len(damaged)} of {checked} in {remote} {'is' if len(damaged) == 1 else 'are'} "
            f"damaged: {_names([c.ref for c in damaged])}; {'; '.join(hints)}"
            + ("" if full else " (--full also re-hashes every chunk)")
        )
    hashed = (
        f", {console.plural(checks.chunks_hashed, 'chunk')} re-hashed "
        f"({console.fmt_bytes(checks.bytes_hashed)})"
        if full
        else ", every chunk they name is present"
    )
    formats = (
        f", no file fails its format check ({console.plural(checks.files_checked, 'file version')} "
        f"checked, {console.plural(checks.chunks_read, 'chunk')} read)"
    )
    console.info(f"verified {checked} in {remote}{hashed}{formats}: all complete")
    return ExitCode.OK


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
    )
    return ExitCode.OK
