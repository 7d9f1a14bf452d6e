"""The one-shot commands: restore, push, ls, timeline, commit, signal. Each returns an
exit status; a command's output (tables, --json) goes to stdout, ckpt's own
lines through `console`. The commands that look after a repository (show,
diff, verify, gc) are in `operate`.

"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli import config, console, costs
from ckpt_cli.errors import CkptError, ConfigError
from ckpt_cli.history import annotate, load_runs
from ckpt_cli.lease import DEFAULT_TTL, Heartbeat
from ckpt_cli.manifest import Manifest
from ckpt_cli.remote import open_backend
from ckpt_cli.repo_tools import Checked, check, find, open_existing
from ckpt_cli.repository import (
    Repository,
    Suspect,
    newest_manifest,
    pick,
    rank_stream,
    stream_rank,
)


def _open(remote: str, options: dict[str, Any], *, create: bool) -> Repository | None:
    backend = open_backend(remote, options)
    return Repository.open(backend, create=create)


# ---------------------------------------------------------------- restore, push


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
    from ckpt_cli import world
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
        repo.stream = rank_stream(rank, world_size)
        if snapshot is None:
            choice = world.choose(repo, rank, world_size, allow_change=allow_world_change)
            if choice is not None and not choice.consistent:
                console.warn(choice.note)
            if choice is not None and choice.manifest is None:
                console.info(f"{choice.note}: nothing restored")
                return ExitCode.OK
            ref = choice.ref if choice is not None else None
            if ref is not None:
                console.info(f"rank {rank}: {choice.note if choice else ''}")
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
        done = do_restore(
            repo, target, snapshot=snapshot, warn=console.warn, progress=bar.update, ref=ref
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


@contextlib.contextmanager
def _watching(snapshotter: Any, bar: console.Progress) -> Iterator[None]:
    """Feed the bar from the snapshot under way (bytes read and uploaded)."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.1):
            live = snapshotter.live
            if live is not None:
                result, _files, total, _started = live
                bar.update(result.bytes_read, total)

    t = threading.Thread(target=poll, name="ckpt-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def push(
    dir: Path, remote: str, keep: int, options: dict[str, Any], *, allow_empty: bool = False
) -> int:
    from ckpt_cli.kept import recover_interrupted
    from ckpt_cli.snapshotter import Snapshotter, UnreadableError

    source = config.resolve_dir(dir)
    if not source.is_dir():
        raise ConfigError(f"{source} is not a directory (ckpt push [DIR] [REMOTE], or --dir)")
    config.check_remote_outside(source, remote)
    config.check_lasting(remote, "ckpt push")
    recover_interrupted(source)  # a restore killed half-way is finished first
    repo = _open(remote, options, create=True)
    assert repo is not None
    lease = repo.lease(f"push-{secrets.token_hex(4)}", ttl=DEFAULT_TTL)
    lease.acquire(on_wait=console.info)
    beats = Heartbeat(lease, on_error=console.warn)  # a long push is not a dead one
    snapshotter = Snapshotter(repo, source, run="push", may_write=beats.check)
    try:
        with beats:
            newest = newest_manifest(repo)
            if not allow_empty:
                refuse_empty_push(snapshotter.scan_root(), newest, source, repo, keep)
            snapshotter.adopt(newest, trust_local=False)
            with console.Progress(f"pushing {source}") as bar, _watching(snapshotter, bar):
                result = snapshotter.snapshot(reason="push", keep=keep, strict=True)
    except UnreadableError as exc:  # a push is the whole directory or nothing
        raise ConfigError(
            f"cannot read {exc.path} in {source} ({exc.reason}): nothing pushed; make it "
            "readable by ckpt, or move it out of the directory"
        ) from None
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
        held = result.parent.id if result.parent else "none"
        console.info(f"nothing changed since snapshot {held}")
        return ExitCode.OK
    console.info(
        f"pushed snapshot {m.id} (generation {m.generation}): "
        f"{console.plural(len(m.files), 'file')}, "
        f"{console.fmt_bytes(m.total_size)}, {console.fmt_bytes(result.new_bytes)} new, "
        f"{result.seconds:.1f}s"
    )
    return ExitCode.OK


def refuse_empty_push(
    local: list[Any], newest: Manifest | None, source: Path, repo: Repository, keep: int
) -> None:
    """An empty DIR over a history with data would become the newest snapshot
    (what every restore picks) and let --keep drop the ones with data."""
    if any(e.type != "dir" for e in local) or newest is None:
        return
    if all(e.type == "dir" for e in newest.entries):
        return
    raise ConfigError(
        f"{source} is empty and the newest snapshot of {repo.display}, {newest.id}, holds "
        f"{console.plural(len(newest.files), 'file')}: pushing it would make an empty snapshot "
        "the one every "
        f"restore picks, and --keep {keep} would drop older ones; pass --allow-empty if that "
        "is what you want"
    )


# ---------------------------------------------------------------- ls


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
            repo.stream = rank_stream(rank, 2)
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
    "--full` does; a restore skips a snapshot whose chunk is corrupt)"
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


# ---------------------------------------------------------------- timeline


def timeline(
    remote: str,
    options: dict[str, Any],
    *,
    run: str | None = None,
    out: Path | None = None,
    rank: int | None = None,
) -> int:
    """Draw a run and the failed runs it continued: in the terminal, or as
    one self-contained SVG or HTML file (`out`, by its extension)."""
    from ckpt_cli import timeline as chart
    from ckpt_cli import timeline_file

    kind = None if out is None else timeline_file.kind_of(out.name)
    if out is not None:
        if kind is None:
            raise ConfigError(f"--out {out}: name a .html or .svg file (the extension says which)")
        if not out.parent.is_dir():
            raise ConfigError(f"--out {out}: the directory {out.parent} does not exist")
        if out.is_dir():
            raise ConfigError(f"--out {out} is a directory: name a .html or .svg file in it")
    repo = open_existing(remote, options)
    records = load_runs(repo.backend) if repo is not None else []
    if not records:
        console.info(f"{remote} has no run history yet (only `ckpt run` writes one)")
        return ExitCode.OK
    _, runs = chart.choose(records, run, rank)
    now = time.time()
    if out is None or kind is None:
        chart.show(runs, now, console.width())
        return ExitCode.OK
    text = timeline_file.render(runs, now, kind)
    tmp = out.with_name(f".{out.name}.ckpt-{secrets.token_hex(4)}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"--out {out}: {exc.strerror or exc}") from None
    attempts = sum(len(r.attempts) for r in runs)
    console.info(
        f"timeline of {console.plural(len(runs), 'run')} "
        f"({console.plural(attempts, 'attempt')}) written to {out}"
    )
    return ExitCode.OK


# ---------------------------------------------------------------- unsuspect


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


#: The largest step the control socket takes (a manifest's bound too).
MAX_STEP = (1 << 62) - 1


def commit(
    socket_path: str | None, wait: bool, timeout: float | None, step: int | None = None
) -> int:
    if not socket_path:
        raise ConfigError(
            "no supervisor to commit to: CKPT_SOCKET is not set "
            "(run under `ckpt run`, or pass --socket)"
        )
    if timeout is not None:  # the control socket's own checks, as bad flags here (78)
        config.check_number(timeout, f"--timeout {timeout:g}", min=0, max=config.MAX_SECONDS)
    if step is not None:
        config.check_number(step, f"--step {step}", integer=True, min=0, max=MAX_STEP)
    message: dict[str, Any] = {"op": "commit", "wait": wait, "timeout": timeout}
    if step is not None:
        message["step"] = step
    reply = request(socket_path, message)
    if not reply.get("ok"):
        # A file that is not whole or cannot be read (65: the data, not the
        # remote) fails the same commit again; anything else may pass later.
        refused = reply.get("retryable") is False
        raise CkptError(
            f"commit failed: {reply.get('error')}",
            exit_code=ExitCode.DAMAGED if refused else ExitCode.UNAVAILABLE,
        )
    if reply.get("snapshot"):
        tagged = "" if reply.get("step") is None else f" (step {reply['step']})"
        console.info(f"committed: snapshot {reply['snapshot']}{tagged} is durable")
    elif reply.get("pinned"):
        console.info("pinned: the snapshot is being uploaded")
    return ExitCode.OK


def send_signal(socket_path: str | None, directory: Path | None = None) -> int:
    """Send the checkpoint signal through a supervisor's control socket: the
    given one (--socket, or CKPT_SOCKET inside a supervised child), else the
    running `ckpt run` of this user found in the registry `ckpt status`
    reads (the one of `directory` when several run)."""
    if not socket_path:
        from ckpt_cli import control

        problem = control.untrusted_registry()
        if problem:
            console.warn(f"{problem}: not read (give --socket)")
        entries = [] if problem else control.registered()
        socket_path = str(control.pick_run(entries, directory)["socket"])
    reply = request(socket_path, {"op": "signal"})
    if not reply.get("ok"):
        raise CkptError(f"signal not sent: {reply.get('error')}", exit_code=ExitCode.UNAVAILABLE)
    sent = [str(p) for p in reply.get("pids", [])]
    console.info(
        f"checkpoint signal sent to {'pid' if len(sent) == 1 else 'pids'} {', '.join(sent)}"
    )
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
