"""`ckpt ls`: the snapshots of a remote, newest first, with their checks and
state (a multi-node remote's complete steps), or with --runs the run history.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli import console, costs
from ckpt_cli.commands.where import reader
from ckpt_cli.history import annotate, load_runs
from ckpt_cli.manifest import Manifest
from ckpt_cli.repo_tools import open_existing
from ckpt_cli.repository import (
    Suspect,
    pick,
    rank_stream,
    stream_rank,
)
from ckpt_cli.verify import Checked, check


def ls(
    remote: str,
    as_json: bool,
    options: dict[str, Any],
    *,
    runs: bool = False,
    rank: int | None = None,
) -> int:
    from ckpt_cli import world

    repo = open_existing(remote, options)
    if repo is None:
        if as_json:
            console.document({"remote": remote, "snapshots": [], "runs": []})
        else:
            console.info(f"{remote} is empty: no snapshots yet")
        return ExitCode.OK
    ranks_doc: dict[str, Any] = {}
    overview: list[str] | None = None  # a multi-node remote's table, without --rank
    if rank is not None or repo.rank_snapshots():
        w = world.World(repo)
        present = repo.present_chunks()
        gens = w.generations(present)
        counts = {str(stream_rank(s)): len(loaded) for s, loaded in sorted(w.streams.items()) if s}
        ranks_doc = {
            "complete_steps": [g.step for g in gens],
            "world_size": gens[0].world_size if gens else None,
            "ranks": counts,
        }
        if rank is not None:
            repo = repo.for_stream(rank_stream(rank, 2))
        elif not as_json and not runs:
            overview = _world_table(w, gens, present)
        if not as_json and not runs:
            if gens:
                steps = ", ".join(str(g.step) for g in gens[:10])
                console.info(
                    f"steps complete on all {console.plural(gens[0].world_size, 'rank')}, "
                    f"newest first: {steps}"
                )
            else:
                console.info("no step is complete on all ranks (ckpt.commit(step=N) makes one)")
            console.info(
                "snapshots per rank: "
                + ", ".join(f"rank {r}: {n}" for r, n in counts.items())
                + ("" if rank is not None else " (ckpt ls --rank R lists one)")
            )
    checked = check(repo, repo.snapshots()).snapshots
    suspect = repo.suspect_keys()
    marks = {c.ref.key: repo.read_suspect(c.ref.key) for c in checked if c.ref.key in suspect}
    chosen = pick(((c.ref, c.manifest) for c in checked if c.ok and c.manifest), suspect)
    rows = [
        _ls_row(c, marks.get(c.ref.key), chosen is not None and chosen[0] == c.ref) for c in checked
    ]
    if as_json:
        doc = {
            "remote": remote,
            "rehashed": False,  # chunks checked by one listing: see NOT_REHASHED
            "snapshots": rows,
            "runs": annotate(load_runs(repo.backend)),
            **ranks_doc,
        }
        console.document(doc)
        return ExitCode.OK
    if runs:
        history = load_runs(repo.backend)
        if history:
            _runs_table(history)
        else:
            console.info(f"{remote} has no run history yet (only `ckpt run` writes one)")
    elif overview is not None:
        if rows:
            console.info(
                f"the remote also holds {console.plural(len(rows), 'snapshot')} of a "
                "single-node run (--json lists them)"
            )
    elif rows:
        _snapshot_table(rows)
        if chosen is not None:
            console.info(NOT_REHASHED)
    elif not ranks_doc:
        console.info(f"{remote} has no snapshots yet")
    elif rank is not None:
        console.info(f"rank {rank} has no snapshots in {remote}")
    return ExitCode.OK


#: What "newest" rests on: a restore re-hashes every chunk it reads and falls
#: back past a corrupt one, which a listing cannot see (issue 20).
NOT_REHASHED = (
    "newest: every chunk it names is in the store; none was re-hashed (`ckpt verify "
    "--full` does; a restore skips a snapshot whose chunk is corrupt and marks it suspect)"
)


def _world_table(w: Any, gens: list[Any], present: set[str]) -> list[str]:
    """A multi-node remote on stdout: the steps complete on all ranks, newest
    first, the first marked "newest" (what every rank restores); with no
    complete step, each rank's newest snapshot whose chunks all exist (what
    each restores on its own). Returns the columns printed."""
    now = time.time()
    if gens:
        cols = ["step", "ranks", "time", "age", "files", "size", "state"]
        table = [
            [
                str(g.step),
                str(g.world_size),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g.created)),
                _age(now - g.created),
                str(sum(len(m.manifest.files) for m in g.members.values())),
                console.fmt_bytes(sum(m.manifest.total_size for m in g.members.values())),
                "newest" if i == 0 else "",
            ]
            for i, g in enumerate(gens)
        ]
        console.table(cols, table, right=("step", "ranks", "files", "size"))
        return cols
    cols = ["rank", "snapshots", "newest", "gen", "step", "time", "age", "files", "size"]
    table = []
    for stream, loaded in sorted(w.streams.items(), key=lambda kv: stream_rank(kv[0])):
        if not stream:
            continue  # the root: a single-node run's snapshots
        whole = [
            (ref, m)
            for ref, m in loaded
            if isinstance(m, Manifest) and m.chunk_digests() <= present
        ]
        row = [str(stream_rank(stream)), str(len(loaded))]
        if whole:
            ref, m = whole[0]
            row += [
                ref.id,
                str(ref.generation),
                "-" if m.step is None else str(m.step),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created)),
                _age(now - m.created),
                str(len(m.files)),
                console.fmt_bytes(m.total_size),
            ]
        else:
            row += ["none whole", *[""] * 6]
        table.append(row)
    console.table(cols, table, right=("rank", "snapshots", "gen", "step", "files", "size"))
    return cols


def _ls_row(c: Checked, mark: Suspect | None, restore: bool) -> dict[str, Any]:
    """One snapshot as `ckpt ls --json` shows it. ok: the manifest parses and
    every chunk it names exists; checks: verified (no file was in progress
    when it was taken), unverified (taken anyway: `unverified` names the
    files and why) or unchecked (written before ckpt checked); suspect: the
    crash-loop guard's mark (why, time, host, run) or null; restore: the one
    `ckpt restore` and `ckpt run` use (`repository.pick`); state: newest
    (that one), complete, unverified, suspect or damaged; error: what is
    wrong with a damaged one."""
    m = c.manifest
    row: dict[str, Any] = {"id": c.ref.id, "generation": c.ref.generation}
    if m is not None:
        row.update(
            created=m.created,
            files=len(m.files),
            size=m.total_size,
            new_bytes=m.new_bytes,
            attempt=m.attempt,
            host=m.host,
            reason=m.reason,
            step=m.step,
            rank=m.rank,
            world_size=m.world_size,
        )
        row.update(
            verified=m.verified,
            checks={True: "verified", False: "unverified", None: "unchecked"}[m.verified],
            unverified=[{"path": p, "reason": why} for p, why in m.unverified],
        )
    if not c.ok:
        state = "damaged"
    elif restore:
        state = "newest"
    elif mark is not None:
        state = "suspect"
    elif m is not None and m.verified is False:
        state = "unverified"
    else:
        state = "complete"
    row.update(
        ok=c.ok,
        state=state,
        restore=restore,
        suspect=mark.to_json() if mark is not None else None,
    )
    if not c.ok:
        row["error"] = c.summary()
    return row


#: The runs `ckpt ls` shows without --json (the newest ones).
LS_RUNS = 20


def _runs_table(runs: list[dict[str, Any]]) -> None:
    """One row per run, its costs in the last column; then, if any shown run
    failed, one row per failure: when, how, the work lost, the time until
    the next attempt started."""
    ledger = costs.Ledger(runs)
    shown = runs[-LS_RUNS:]
    more = len(runs) - len(shown)
    if more:
        console.info(
            f"the newest {len(shown)} of {console.plural(len(runs), 'run')} (--json for all)"
        )
    table: list[list[str]] = []
    failures: list[list[str]] = []
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
        rc = ledger.runs[str(r["run"])]
        table.append(
            [
                str(r["run"]),
                str(r.get("host", "")),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"])),
                span,
                exits,
                preempted,
                str(r.get("outcome") or "running or killed"),
                costs.describe(rc.totals()),
            ]
        )
        failures += [_failure_row(rc, a) for a in rc.attempts if a.failure]
    cols = ("run", "host", "started", "attempts", "exits", "preemption", "outcome", "cost")
    console.table(cols, table)
    if failures:
        console.out([""])
        console.table(
            ("run", "attempt", "ended", "exit", "outcome", "work lost", "resumed after"),
            failures,
            right=("attempt", "work lost", "resumed after"),
        )


def _failure_row(rc: costs.RunCosts, a: costs.AttemptCost) -> list[str]:
    """A failure: the work it lost, and how long until the next attempt
    started ("-": none has yet). A killed run's end is its last sign of life."""
    resumed = "-" if a.followed_by is None else _seconds(a.followed_by.resume)
    lost = _seconds(a.lost)
    ended = "?" if a.end is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.end))
    if a.end_seen:
        ended = f"after {ended}"
    return [rc.run, str(a.number or "?"), ended, a.exit or "-", str(a.outcome), lost, resumed]


def _seconds(value: float | None) -> str:
    return "unknown" if value is None else costs.duration(value)


def _snapshot_table(rows: list[dict[str, Any]]) -> None:
    table: list[list[str]] = []
    steps = any(r.get("step") is not None for r in rows)
    cols = ("id", "gen", *(("step",) if steps else ()), "time", "age", "files", "size", "new")
    cols += ("attempt", "host", "checks", "state")
    now = time.time()
    for r in rows:
        state = _state_text(r)
        step = [] if not steps else ["-" if r.get("step") is None else str(r["step"])]
        if "created" not in r:
            table.append([r["id"], str(r["generation"]), *step, *[""] * 8, state])
            continue
        table.append(
            [
                r["id"],
                str(r["generation"]),
                *step,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])),
                _age(now - r["created"]),
                str(r["files"]),
                console.fmt_bytes(r["size"]),
                console.fmt_bytes(r["new_bytes"]),
                str(r["attempt"] or "-"),
                str(r["host"]),
                "-" if r["checks"] == "unchecked" else r["checks"],
                "" if state == "complete" else state,
            ]
        )
    console.table(cols, table, right=("gen", "step", "files", "size", "new", "attempt"))


def _state_text(r: dict[str, Any]) -> str:
    """The state column: what a restore makes of the snapshot, and why."""
    if not r["ok"]:
        return f"damaged: {r['error']}"
    mark = r.get("suspect")
    if mark is not None:
        at = mark.get("time")
        when = f" at {time.strftime('%Y-%m-%d %H:%M', time.localtime(at))}" if at else ""
        on = f" on {mark['host']}" if mark.get("host") else ""
        detail = f"suspect: {mark['why']} (marked{on}{when})"
        return f"newest, {detail}" if r["state"] == "newest" else detail
    if r["state"] == "unverified":
        return "unverified (a restore prefers a verified one)"
    return str(r["state"])


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def main(
    remote_arg: str | None,
    *,
    json_out: bool,
    runs: bool,
    remote: str | None,
    dir: Path | None,
    storage_option: list[str] | None,
    rank: int | None,
) -> int:
    """`ckpt ls [REMOTE]`."""
    where = reader("ls", remote_arg, remote, dir, storage_option)
    return ls(where.remote, json_out, where.storage_options, runs=runs, rank=rank)
