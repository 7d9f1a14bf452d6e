"""What --dir goes through around and between attempts: brought to what the
child starts from (restore's rule, also again on every rank before a
relaunch of a multi-node job), its torn files put back after a failure, the
crash-loop guard's rollback, a restore when it vanished during a backoff,
and a snapshot asked for (protecting what an attempt left, or at once under
a preemption notice). The attempt loop drives it through `Between`."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ckpt_cli import console, crashloop
from ckpt_cli.config import RunConfig, wait_limit
from ckpt_cli.errors import RemoteError, RestoreError
from ckpt_cli.formats import DEFAULT as DEFAULT_CHECKS
from ckpt_cli.manifest import Manifest, ManifestError
from ckpt_cli.repair import Repaired, repair_dir
from ckpt_cli.repository import Repository, SnapshotRef
from ckpt_cli.restore import ensure_dir, prepare_rank_dir, restore_into, rollback_target
from ckpt_cli.snapshotter import Snapshotter
from ckpt_cli.watcher import Watcher
from ckpt_cli.worker import Request, SnapshotWorker

#: Snapshots of this run the crash-loop guard remembers (the newest): a
#: streak has no snapshot taken while its attempts ran, so it needs few.
SNAPS_KEPT = 1000


class Taken:
    """The snapshots this run took (the newest SNAPS_KEPT), what the crash-loop
    guard judges by. The snapshot thread adds, the loop reads."""

    def __init__(self) -> None:
        self._snaps: list[crashloop.Snap] = []
        self._lock = threading.Lock()

    def add(self, m: Manifest) -> None:
        with self._lock:
            self._snaps.append(crashloop.Snap(m.id, m.generation, m.created, m.reason))
            del self._snaps[:-SNAPS_KEPT]

    def list(self) -> list[crashloop.Snap]:
        """Oldest first."""
        with self._lock:
            return list(self._snaps)


def prepare(
    cfg: RunConfig,
    repo: Repository,
    snapshotter: Snapshotter,
    on_repair: Callable[[Repaired], None],
    *,
    restore_enabled: bool = True,
    snapshot: str | None = None,
) -> tuple[str, int | None]:
    """Bring --dir to what this run's child starts from (restore's rule)."""
    return prepare_rank_dir(
        repo,
        snapshotter,
        rank=cfg.rank,
        world_size=cfg.world_size,
        allow_change=cfg.allow_world_change,
        restore_enabled=restore_enabled,
        snapshot=snapshot,
        concurrency=cfg.concurrency,
        on_repair=on_repair,
    )


class Recovery:
    """`Between` on the real --dir, repository, snapshot worker and watcher."""

    def __init__(
        self,
        cfg: RunConfig,
        repo: Repository,
        snapshotter: Snapshotter,
        worker: SnapshotWorker,
        watcher: Watcher,
        *,
        run_id: str,
        patterns: list[str],
        taken: Taken,
        on_repair: Callable[[Repaired], None],
        on_rollback: Callable[[dict[str, object]], None],
    ) -> None:
        self.cfg = cfg
        self.repo = repo
        self.snapshotter = snapshotter
        self.worker = worker
        self.watcher = watcher
        self.run_id = run_id
        self.patterns = patterns  # what snapshots leave out (temp files, --exclude)
        self.taken = taken
        self.on_repair = on_repair
        self.on_rollback = on_rollback  # the run history's record of one
        self.guard = crashloop.Guard(cfg.crash_loop)
        self.rolled_back: Manifest | None = None  # the next launch's CKPT_RESTORED
        self.rollbacks: list[str] = []  # for the summary

    # ------------------------------------------------------------ Between

    def last_durable(self) -> tuple[str, int | None] | None:
        last = self.worker.stats.last_durable
        return (last.id, last.step) if last else None

    def take_rolled_back(self) -> tuple[str, int | None] | None:
        """The snapshot the crash-loop guard restored, once."""
        m, self.rolled_back = self.rolled_back, None
        return (m.id, m.step) if m is not None else None

    def reprepare(self) -> tuple[str, int | None]:
        """Every rank relaunches from the same step: the newest one all ranks
        committed, not this rank's own newest state. ("", None): the dir was
        kept as the attempt left it (auto mode)."""
        self.worker.request("exit").wait(wait_limit(self.cfg.flush_timeout))
        self.watcher.stop()
        try:
            return prepare(self.cfg, self.repo, self.snapshotter, self.on_repair)
        finally:
            self.watcher.start()

    def watch(self) -> None:
        self.watcher.ensure()

    def repair(self) -> None:
        """Put back the files a failed attempt left torn (repair.repair_dir):
        before any snapshot of what it left, and before a relaunch (the torn
        ones are kept, never deleted)."""
        done = repair_dir(
            self.repo,
            self.cfg.dir,
            self.patterns,
            parent=self.snapshotter.parent,
            warn=console.warn,
            registry=self.snapshotter.checks or DEFAULT_CHECKS,
        )
        if not done.empty:
            self.on_repair(done)

    def failed(
        self, *, attempt: int, started_from: str, launched: float, exited: float, status: str
    ) -> None:
        """A failed attempt is retried: the crash-loop guard judges it (and
        may roll back); else what it left is snapshotted while we back off."""
        loop = self.guard.ended(
            attempt=attempt,
            started_from=started_from,
            launched=launched,
            exited=exited,
            failed=True,
            status=status,
            snaps=self.taken.list(),
        )
        if loop is not None:
            self._roll_back(loop)
        else:
            self.worker.request("exit")  # protect what the attempt left while we back off

    def snapshot_now(self) -> None:
        """Under a preemption notice: the child's save, snapshotted at once."""
        self.worker.debounce = min(self.worker.debounce, 0.5)
        self.worker.request("preemption")

    def restore_if_gone(self) -> str | None:
        """After a backoff: restore --dir if it disappeared; the snapshot
        restored ("" for none), or None if the dir is there."""
        cfg = self.cfg
        if cfg.dir.is_dir():
            return None
        console.warn(f"{cfg.dir} disappeared: restoring it before the retry")
        self.watcher.stop()
        restored = restore_into(self.repo, self.snapshotter, None, cfg.concurrency)
        ensure_dir(cfg.dir)
        self.watcher.start()
        return restored

    # ------------------------------------------------------------ crash loop

    def _roll_back(self, loop: crashloop.Verdict) -> None:
        """The crash-loop guard fired: mark the snapshot the failing attempts
        started from (and the snapshots their exits made) suspect, and
        restore the snapshot before it for the next attempt."""
        # What the failures left, snapshotted first: nothing local is lost,
        # and the snapshot it makes is as suspect as the rest.
        req = self.worker.request("exit")
        req.wait(wait_limit(self.cfg.flush_timeout))
        found = self._suspects(loop, req)
        if found is None:
            return
        base, refs, target = found
        self._mark(loop, base, refs, target)
        if self.cfg.world_size > 1 and _step_of(self.repo, base) is not None:
            return  # the relaunch restores the step before it on every rank (prepare)
        self._restore_back()

    def _suspects(
        self, loop: crashloop.Verdict, req: Request
    ) -> tuple[SnapshotRef, list[SnapshotRef], Manifest] | None:
        """The snapshot the streak started from, those to mark suspect, and
        the one to roll back to; None (said) if there is nothing to roll back."""
        repo = self.repo
        ids = list(loop.suspect)
        failed = ", ".join(map(str, loop.attempts))
        try:
            base = repo.find(ids[0])
            made = req.manifest
            # Made by this request: the newest this run took, and newer than S.
            taken = self.taken.list()
            newest = taken[-1].id if taken else None
            later = made is not None and base is not None and made.generation > base.generation
            if made is not None and later and made.id not in ids and made.id == newest:
                ids.append(made.id)
            refs = [r for i in ids if (r := repo.find(i)) is not None and r.stream == repo.stream]
            if base is None or base.stream != repo.stream:
                console.warn(
                    f"crash loop: attempts {failed} failed right after a restore of snapshot "
                    f"{ids[0]}, which is gone from {repo.display}: nothing to roll back"
                )
                return None
            target = rollback_target(repo, base, {r.key for r in refs})
        except RemoteError as exc:
            console.warn(f"crash loop: attempts {failed} failed; no rollback ({exc})")
            return None
        if target is None:
            console.warn(
                f"crash loop: attempts {failed} failed ({', '.join(loop.statuses)}) right after "
                f"a restore of snapshot {base.id} (generation {base.generation}), and no "
                "snapshot before it is left to roll back to: relaunching on it"
            )
            return None
        return base, refs, target

    def _mark(
        self,
        loop: crashloop.Verdict,
        base: SnapshotRef,
        refs: list[SnapshotRef],
        target: Manifest,
    ) -> None:
        """Mark the suspects, and say so (console, events, run history)."""
        repo, cfg = self.repo, self.cfg
        failed = ", ".join(map(str, loop.attempts))
        statuses = ", ".join(loop.statuses)
        why = f"crash loop: attempts {failed} failed ({statuses}) right after its restore"
        for ref in refs:
            try:
                repo.mark_suspect(
                    ref,
                    why,
                    run=self.run_id,
                    attempts=list(loop.attempts),
                    statuses=list(loop.statuses),
                )
            except RemoteError as exc:
                console.warn(
                    f"could not mark snapshot {ref.id} suspect in {repo.display} ({exc}); "
                    "this run still treats it as suspect"
                )
        others = [r.id for r in refs[1:]]
        also = f" (and {', '.join(others)}, taken after those failures)" if others else ""
        console.warn(
            f"CRASH LOOP: attempts {failed} failed ({statuses}) right after a restore of "
            f"snapshot {base.id} (generation {base.generation}), before any newer snapshot: "
            f"marked it suspect in {repo.display}{also}; rolling back to snapshot {target.id} "
            f"(generation {target.generation}). `ckpt unsuspect {repo.display} {base.id}` "
            f"clears the mark (--crash-loop {cfg.crash_loop}; 0 turns the guard off)"
        )
        self.rollbacks.append(f"{base.id} -> {target.id}")
        self.on_rollback(
            {
                "snapshot": base.id,
                "generation": base.generation,
                "marked": [r.id for r in refs],
                "to": target.id,
                "to_generation": target.generation,
                "attempts": list(loop.attempts),
                "statuses": list(loop.statuses),
            }
        )

    def _restore_back(self) -> None:
        cfg, snapshotter = self.cfg, self.snapshotter
        self.watcher.stop()
        try:
            held = restore_into(self.repo, snapshotter, None, cfg.concurrency)
        except (RestoreError, RemoteError) as exc:
            console.warn(
                f"the rollback's restore failed ({exc}): relaunching on {cfg.dir} as it is"
            )
            return
        finally:
            ensure_dir(cfg.dir)
            self.watcher.start()
        if held and snapshotter.parent is not None and snapshotter.parent.id == held:
            self.rolled_back = snapshotter.parent


def _step_of(repo: Repository, ref: SnapshotRef) -> int | None:
    """The training step a snapshot was committed with (None: none, or unreadable)."""
    try:
        return repo.load_cached(ref).step
    except ManifestError:
        return None
