"""`ckpt show`: the files of one snapshot (path, type, mode, size, chunks,
mtime).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli import config, console
from ckpt_cli.commands._shared import _clock, _emit_json, _meta, _require
from ckpt_cli.commands.where import place, reader
from ckpt_cli.diff import entry_json
from ckpt_cli.errors import ConfigError
from ckpt_cli.manifest import Entry, Manifest
from ckpt_cli.repo_tools import DamagedError, find, load, open_existing
from ckpt_cli.repository import Repository, SnapshotRef


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


def main(
    args: list[str] | None,
    *,
    json_out: bool,
    remote: str | None,
    dir: Path | None,
    storage_option: list[str] | None,
) -> int:
    """`ckpt show [REMOTE] [SNAPSHOT]`: one argument that reads as a snapshot
    and is no path here is the snapshot."""
    values = args or []
    if len(values) == 1 and remote is None and config.names_snapshot(values[0]):
        if Path(values[0]).exists():
            raise ConfigError(
                f"{values[0]!r} names a snapshot and a path here: say `ckpt show --remote "
                f"{values[0]}` for the path, or `ckpt show REMOTE {values[0]}`",
                exit_code=ExitCode.USAGE,
            )
        placed = {"snapshot": values[0]}
    else:
        placed = place("show", ("remote", "snapshot"), values, taken={"remote": remote})
    where = reader("show", placed.get("remote"), remote, dir, storage_option)
    return show(where.remote, placed.get("snapshot"), json_out, where.storage_options)
