"""What the commands that look after a repository (show, diff, verify, gc)
share: names of snapshots, times, a manifest's metadata, --json output.
"""

from __future__ import annotations

import time
from typing import Any

from ckpt_cli import console
from ckpt_cli.errors import ConfigError
from ckpt_cli.manifest import Manifest
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
