"""`ckpt unsuspect`: clear the crash-loop guard's mark of a snapshot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli import console
from ckpt_cli.commands.where import place, reader
from ckpt_cli.errors import ConfigError
from ckpt_cli.repo_tools import find, open_existing


def unsuspect(remote: str, snapshot: str, options: dict[str, Any]) -> int:
    """Clear the crash-loop guard's mark of a snapshot: restores may pick it
    again. A snapshot without a mark is left as it is (exit 0)."""
    repo = open_existing(remote, options)
    if repo is None:
        raise ConfigError(f"no snapshot {snapshot!r} in {remote}: it is empty (see `ckpt ls`)")
    ref = find(repo, snapshot)
    name = f"snapshot {ref.id} (generation {ref.generation})"
    if repo.clear_suspect(ref):
        console.info(
            f"cleared the suspect mark of {name} in {remote}: `ckpt restore` and `ckpt run` "
            "may pick it again"
        )
    else:
        console.info(f"{name} in {remote} is not marked suspect: nothing to clear")
    return ExitCode.OK


def main(
    args: list[str],
    *,
    remote: str | None,
    dir: Path | None,
    storage_option: list[str] | None,
) -> int:
    """`ckpt unsuspect [REMOTE] SNAPSHOT`."""
    placed = place(
        "unsuspect",
        ("remote", "snapshot"),
        args,
        taken={"remote": remote},
        required=("snapshot",),
    )
    where = reader("unsuspect", placed.get("remote"), remote, dir, storage_option)
    return unsuspect(where.remote, placed["snapshot"], where.storage_options)
