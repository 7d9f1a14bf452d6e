"""`ckpt verify`: every manifest parses, every chunk it names exists, every
stored file passes its format check; --full re-hashes every chunk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli import console
from ckpt_cli.commands._shared import _emit_json, _names, _require
from ckpt_cli.commands.where import reader
from ckpt_cli.repo_tools import DamagedError, find, open_existing
from ckpt_cli.verify import check


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


def main(
    remote_arg: str | None,
    *,
    snapshot: str | None,
    full: bool,
    json_out: bool,
    remote: str | None,
    dir: Path | None,
    storage_option: list[str] | None,
) -> int:
    """`ckpt verify [REMOTE]`."""
    where = reader("verify", remote_arg, remote, dir, storage_option)
    return verify(where.remote, snapshot, full, json_out, where.storage_options)
