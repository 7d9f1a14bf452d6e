"""The one-shot commands: restore, push, ls, commit. Each returns an exit status.

Imports: the storage modules, `console`; rich tables lazily.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli import config, console
from ckpt_cli.errors import CkptError, ConfigError, RemoteError
from ckpt_cli.history import load_runs
from ckpt_cli.manifest import Manifest
from ckpt_cli.remote import open_backend, parse_storage_options
from ckpt_cli.repository import Repository, iter_manifests, newest_manifest


def _open(remote: str, options: list[str], *, create: bool) -> Repository | None:
    backend = open_backend(remote, parse_storage_options(options))
    return Repository.open(backend, create=create)


def restore(remote: str, dir: Path, snapshot: str | None, options: list[str]) -> int:
    from ckpt_cli.restore import restore as do_restore

    target = config.resolve_dir(dir)
    config.check_remote_outside(target, remote)
    repo = _open(remote, options, create=False)
    if repo is None:
        raise RemoteError(f"no ckpt repository at {remote} (check --remote / the URL)")
    done = do_restore(repo, target, snapshot=snapshot, warn=console.warn)
    if done is None:
        console.info(f"{remote} has no snapshot: nothing restored")
        return ExitCode.OK
    m = done.manifest
    console.info(
        f"restored snapshot {m.id} (generation {m.generation}, {len(m.files)} files, "
        f"{console.fmt_bytes(m.total_size)}) into {target} in {done.seconds:.1f}s"
    )
    return ExitCode.OK


def push(dir: Path, remote: str, keep: int, options: list[str]) -> int:
    from ckpt_cli.snapshotter import Snapshotter

    source = config.resolve_dir(dir)
    if not source.is_dir():
        raise ConfigError(f"{source} is not a directory (ckpt push DIR REMOTE)")
    config.check_remote_outside(source, remote)
    repo = _open(remote, options, create=True)
    assert repo is not None
    lease = repo.lease(f"push-{secrets.token_hex(4)}", ttl=60.0)
    lease.acquire()
    snapshotter = Snapshotter(repo, source, run="push")
    try:
        snapshotter.adopt(newest_manifest(repo), trust_local=False)
        result = snapshotter.snapshot(reason="push", keep=keep)
    finally:
        snapshotter.close()
        lease.release()
    if result.skipped_links:
        console.warn(
            "symlinks that lead out of the directory are not snapshotted: "
            + ", ".join(result.skipped_links[:5])
        )
    if result.unstable:
        console.warn(
            "changed while being read, kept at their previous version: "
            + ", ".join(result.unstable[:5])
        )
    m = result.manifest
    if m is None:
        newest = result.parent.id if result.parent else "none"
        console.info(f"nothing changed since snapshot {newest}")
        return ExitCode.OK
    console.info(
        f"pushed snapshot {m.id} (generation {m.generation}): {len(m.files)} files, "
        f"{console.fmt_bytes(m.total_size)}, {console.fmt_bytes(result.new_bytes)} new, "
        f"{result.seconds:.1f}s"
    )
    return ExitCode.OK


def ls(remote: str, as_json: bool, options: list[str], *, runs: bool = False) -> int:
    repo = _open(remote, options, create=False)
    if repo is None:
        raise RemoteError(f"no ckpt repository at {remote} (check the URL)")
    rows: list[dict[str, Any]] = []
    for ref, m in iter_manifests(repo):
        if isinstance(m, Manifest):
            rows.append(
                {
                    "id": m.id,
                    "generation": m.generation,
                    "created": m.created,
                    "files": len(m.files),
                    "size": m.total_size,
                    "new_bytes": m.new_bytes,
                    "attempt": m.attempt,
                    "host": m.host,
                    "reason": m.reason,
                    "ok": True,
                }
            )
        else:
            rows.append(
                {"id": ref.id, "generation": ref.generation, "ok": False, "error": f"manifest {m}"}
            )
    if as_json:
        doc = {"remote": remote, "snapshots": rows, "runs": load_runs(repo.backend)}
        print(json.dumps(doc, indent=1))
        return ExitCode.OK
    if runs:
        history = load_runs(repo.backend)
        if history:
            _runs_table(history)
        else:
            console.info(f"{remote} has no run history yet (only `ckpt run` writes one)")
    elif rows:
        _snapshot_table(rows)
    else:
        console.info(f"{remote} has no snapshots yet")
    return ExitCode.OK


#: The runs `ckpt ls` shows without --json (the newest ones).
LS_RUNS = 20


def _runs_table(runs: list[dict[str, Any]]) -> None:
    from rich.table import Table

    shown = runs[-LS_RUNS:]
    more = len(runs) - len(shown)
    if more:
        console.info(f"the newest {len(shown)} of {len(runs)} runs (--json for all)")
    table = Table(box=None, pad_edge=False)
    for col in ("run", "host", "started", "attempts", "exits", "preemption", "outcome"):
        table.add_column(col)
    for r in shown:
        attempts = r["attempts"]
        numbers = [a.get("number") for a in attempts]
        span = (
            "-"
            if not numbers
            else str(numbers[0])
            if len(numbers) == 1
            else f"{numbers[0]}-{numbers[-1]}"
        )
        exits = ", ".join(str(a.get("exit") or "running?") for a in attempts) or "-"
        pre = r.get("preemption") or {}
        preempted = f"{pre.get('cloud', '?')} {pre.get('action', '')}".strip() if pre else ""
        table.add_row(
            str(r["run"]),
            str(r.get("host", "")),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"])),
            span,
            exits,
            preempted,
            str(r.get("outcome") or "running or killed"),
        )
    console.table(table)


def _snapshot_table(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("id", "gen", "time", "age", "files", "size", "new", "attempt", "host"):
        table.add_column(
            col, justify="right" if col in ("gen", "files", "size", "new", "attempt") else "left"
        )
    now = time.time()
    for r in rows:
        if not r["ok"]:
            table.add_row(r["id"], str(r["generation"]), "damaged:", r["error"], "", "", "", "", "")
            continue
        table.add_row(
            r["id"],
            str(r["generation"]),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])),
            _age(now - r["created"]),
            str(r["files"]),
            console.fmt_bytes(r["size"]),
            console.fmt_bytes(r["new_bytes"]),
            str(r["attempt"] or "-"),
            r["host"],
        )
    console.table(table)


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def commit(socket_path: str | None, wait: bool, timeout: float | None) -> int:
    if not socket_path:
        raise ConfigError(
            "no supervisor to commit to: CKPT_SOCKET is not set "
            "(run under `ckpt run`, or pass --socket)"
        )
    reply = request(socket_path, {"op": "commit", "wait": wait, "timeout": timeout})
    if not reply.get("ok"):
        raise CkptError(f"commit failed: {reply.get('error')}", exit_code=ExitCode.UNAVAILABLE)
    if reply.get("snapshot"):
        console.info(f"committed: snapshot {reply['snapshot']} is durable")
    elif reply.get("pinned"):
        console.info("pinned: the snapshot is being uploaded")
    return ExitCode.OK


def send_signal(socket_path: str | None) -> int:
    if not socket_path:
        raise ConfigError("no supervisor to signal: CKPT_SOCKET is not set (pass --socket)")
    reply = request(socket_path, {"op": "signal"})
    if not reply.get("ok"):
        raise CkptError(f"signal not sent: {reply.get('error')}", exit_code=ExitCode.UNAVAILABLE)
    pids = ", ".join(str(p) for p in reply.get("pids", []))
    console.info(f"checkpoint signal sent to pid {pids}")
    return ExitCode.OK


def request(socket_path: str, message: dict[str, Any]) -> dict[str, Any]:
    """One request/reply on the control socket (the shim's client, ckpt errors)."""
    from ckpt._control import CommitError
    from ckpt._control import request as send

    if not os.path.exists(socket_path):
        raise ConfigError(f"control socket {socket_path} does not exist (is ckpt run alive?)")
    try:
        return send(message, path=socket_path)
    except CommitError as exc:
        raise CkptError(str(exc), exit_code=ExitCode.UNAVAILABLE) from None
