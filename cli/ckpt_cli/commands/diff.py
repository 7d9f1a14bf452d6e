"""`ckpt diff`: what changed from snapshot A to B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli import console
from ckpt_cli.commands._shared import _emit_json, _meta, _require
from ckpt_cli.commands.where import place, reader
from ckpt_cli.diff import diff as diff_manifests
from ckpt_cli.diff import entry_json
from ckpt_cli.manifest import Entry
from ckpt_cli.repo_tools import find, load, open_existing


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


def main(
    args: list[str],
    *,
    json_out: bool,
    remote: str | None,
    dir: Path | None,
    storage_option: list[str] | None,
) -> int:
    """`ckpt diff [REMOTE] A B`."""
    placed = place(
        "diff", ("remote", "a", "b"), args, taken={"remote": remote}, required=("a", "b")
    )
    where = reader("diff", placed.get("remote"), remote, dir, storage_option)
    return diff(where.remote, placed["a"], placed["b"], json_out, where.storage_options)
