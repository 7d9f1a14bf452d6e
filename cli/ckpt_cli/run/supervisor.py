"""`ckpt run`: set a run up (repository, lease, restore, snapshot worker,
watcher, control socket, signals), hand it to the attempt loop, then flush,
tear down and end with the outcome. A coordinator: each job is a room of
its own in this package (attempts, signals, window, lease_keeper, flush,
reporter, recovery); the clock and the process factory are handed in.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckpt import _contract as contract
from ckpt_cli import console, openfiles, processes
from ckpt_cli import control as control_registry
from ckpt_cli.backends import open_backend
from ckpt_cli.backends.urls import redact_url
from ckpt_cli.config import RunConfig, private_store_dirs, wait_limit
from ckpt_cli.control import ControlServer
from ckpt_cli.errors import CkptError, RemoteError, Stopped
from ckpt_cli.events import EventLog
from ckpt_cli.formats import Registry
from ckpt_cli.history import RunHistory, attempts_before, load_runs
from ckpt_cli.repository import Repository, rank_stream
from ckpt_cli.restore import ensure_dir
from ckpt_cli.run import live, preemption
from ckpt_cli.run.attempts import AttemptLoop, Spawn
from ckpt_cli.run.child import Child, Guardian
from ckpt_cli.run.clock import Clock, SystemClock
from ckpt_cli.run.flush import FinalFlush, outcome
from ckpt_cli.run.lease_keeper import LeaseKeeper
from ckpt_cli.run.recovery import Recovery, Taken, prepare
from ckpt_cli.run.reporter import Reporter
from ckpt_cli.run.signals import (
    FORWARD_SIGNALS,
    NOTICE_WAKE,
    STOP_SIGNALS,
    CheckpointSignal,
    WakePipe,
    early_stop_handlers,
)
from ckpt_cli.run.window import NoticeBoard
from ckpt_cli.snapshotter import TEMP_PATTERNS, SnapshotResult, Snapshotter
from ckpt_cli.watcher import Watcher
from ckpt_cli.worker import SnapshotWorker

#: How long the first launch waits for the first answer of the metadata
#: service (a machine already under notice launches nothing). Azure's first
#: call may take minutes: the launch does not wait for that.
FIRST_POLL_WAIT = 3.0


class Supervisor:
    def __init__(
        self,
        cfg: RunConfig,
        *,
        rng: random.Random | None = None,
        clock: Clock | None = None,
        spawn: Spawn = Child,
    ) -> None:
        self.cfg = cfg
        self.rng = rng or random.Random()
        self.clock = clock or SystemClock()
        self.spawn = spawn
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
        self.patterns = TEMP_PATTERNS + cfg.excludes
        self.events = EventLog(getattr(cfg, "log_json", None), self.run_id)
        self.reporter = Reporter(self.events, run_id=self.run_id, settle_timeout=cfg.settle_timeout)
        self.board = NoticeBoard()
        self.lease = LeaseKeeper()
        self.taken = Taken()
        self._exclude: set[int] = set()  # ckpt's own helpers below it (the guardian)
        self.wake = WakePipe(self._reaped)
        self.checkpoint = CheckpointSignal(cfg.checkpoint_signal, self._exclude)
        self.loop: AttemptLoop | None = None  # from the launch of the child on
        self._attempts_before = 0  # CKPT_ATTEMPT of earlier runs (the run history)
        self._launching = False  # True once the loop's handlers are in: no more Stopped
        self._poller: preemption.Poller | None = None
        self._stop_watching = threading.Event()
        self._first_poll = threading.Event()
        self._worker: SnapshotWorker | None = None
        self._registered: Path | None = None  # the run's entry in the control registry

    @property
    def attempt(self) -> int:
        return self.loop.attempt if self.loop is not None else self._attempts_before

    # ------------------------------------------------------------ entry point

    def run(self) -> int:
        """Restore, supervise, flush; the exit status. ckpt is made a child
        subreaper for the duration (and PID 1 of a container needs exactly
        that): orphans of the job are re-parented to it and reaped."""
        early = early_stop_handlers(lambda: not self._launching)
        # Where the kernel refuses (not Linux), orphans go to init as usual.
        was_subreaper = processes.is_subreaper() or not processes.set_subreaper(True)
        try:
            return self._run_opened()
        except (CkptError, Stopped) as exc:
            # The JSON log ends with an `end` event whatever the way out.
            status = 128 + exc.signum if isinstance(exc, Stopped) else exc.exit_code
            word = f"error: {exc}" if isinstance(exc, CkptError) else "stopped"
            attempts = len(self.loop.attempts) if self.loop is not None else 0
            self.reporter.end(status, word, attempts)
            raise
        finally:
            self.events.close()
            if not was_subreaper:
                processes.set_subreaper(False)
            for sig, handler in early.items():
                signal.signal(sig, handler)

    def _run_opened(self) -> int:
        cfg = self.cfg
        self.reporter.start(
            redact_url(cfg.remote),
            default_remote=cfg.remote_is_default,
            dir=str(cfg.dir),
            command=cfg.command,
        )
        self._poller = preemption.poller_for(cfg.preemption)
        self.reporter.watching(self._poller, cfg.preemption)
        # From the start: a machine already under notice launches nothing.
        if self._poller is not None:
            self.board.watch(
                self._poller,
                wake=lambda: self.wake.notify(NOTICE_WAKE),
                on_hibernation=self._hibernation,
                stop=self._stop_watching,
                first_poll=self._first_poll,
            )
        try:
            repo = _open_repository(cfg)
            with self.lease.held(repo, self.run_id, cfg.lease_timeout):
                return self._run_holding(repo)
        finally:
            self._stop_watching.set()

    # ------------------------------------------------------------ set up

    def _run_holding(self, repo: Repository) -> int:
        cfg = self.cfg
        earlier: list[dict[str, Any]] = []
        try:
            earlier = load_runs(repo.backend)
            self._attempts_before = attempts_before(earlier, exclude=self.run_id, rank=cfg.rank)
        except RemoteError as exc:
            console.warn(f"run history not read ({exc}): CKPT_ATTEMPT counts this run only")
        snapshotter = _snapshotter_for(cfg, repo, self.run_id, self.patterns, self.lease.check)
        restored_id, restored_step = prepare(
            cfg,
            repo,
            snapshotter,
            self.reporter.repaired,
            restore_enabled=cfg.restore,
            snapshot=cfg.snapshot,
        )
        descends_from: tuple[str, int | None] = ("", None)
        parent = snapshotter.parent
        if not restored_id and cfg.restore and cfg.world_size == 1 and parent is not None:
            # A --dir newer than the newest snapshot was kept (restore's rule):
            # it descends from that snapshot, the parent of its next one, and
            # the child is told so, as after a relaunch (CKPT_RESTORED).
            descends_from = (parent.id, parent.step)
        ensure_dir(cfg.dir)
        ref = repo.find(restored_id) if restored_id else None
        self.reporter.starts_from(restored_id, ref.generation if ref else None)
        worker = self._worker_for(snapshotter)
        if not restored_id and _holds_files(cfg.dir):
            # --dir holds data no snapshot has (the remote has none yet, or
            # --dir is newer than its newest): the start plan said it is
            # uploaded, so it is, one --debounce from now, not at the first
            # rescan (a machine lost before it would lose it all).
            worker.changed()
        watcher = Watcher(cfg.dir, worker.changed, self.patterns)
        recovery = Recovery(
            cfg,
            repo,
            snapshotter,
            worker,
            watcher,
            run_id=self.run_id,
            patterns=list(self.patterns),
            taken=self.taken,
            on_repair=self.reporter.repaired,
            on_rollback=self.reporter.rolled_back,
        )
        return self._run_ready(repo, recovery, (restored_id, restored_step), descends_from, earlier)

    def _worker_for(self, snapshotter: Snapshotter) -> SnapshotWorker:
        cfg, reporter = self.cfg, self.reporter
        worker = SnapshotWorker(
            snapshotter,
            debounce=cfg.debounce,
            rescan=cfg.rescan,
            keep=cfg.keep,
            attempt=lambda: self.attempt,
            on_snapshot=self._snapshot_taken,
            on_error=reporter.snapshot_failed,
            on_recovered=reporter.recovered,
            on_prune_error=lambda message: console.warn(
                f"retention failed: {message}; older snapshots stay until the next "
                "snapshot's retention removes them"
            ),
            commit_only=cfg.snapshots == "commit",
            settle=cfg.settle_timeout,
            open_scan=self._open_scan,
            on_wait=reporter.wait_news,
        )
        self._worker = reporter.worker = worker
        return worker

    def _run_ready(
        self,
        repo: Repository,
        recovery: Recovery,
        restored: tuple[str, int | None],
        descends_from: tuple[str, int | None],
        earlier: list[dict[str, Any]],
    ) -> int:
        """Launch and supervise with everything set up; tear it all down."""
        cfg, worker = self.cfg, recovery.worker
        runtime = _runtime_dir()
        control = ControlServer(
            runtime / "control.sock",
            worker,
            self._status,
            hello=self.checkpoint.hello,
            send_signal=self._send_checkpoint_signal,
        )
        guardian = Guardian()
        self._exclude.add(guardian.pid)
        loop = self.loop = self._loop_for(recovery, guardian, control.path)
        loop.restored_id, loop.restored_step = restored
        loop.descends_from = descends_from
        old_handlers = self.wake.install({*STOP_SIGNALS, *FORWARD_SIGNALS, cfg.checkpoint_signal})
        self._launching = True  # when the early handlers come back, they only ignore
        flush = FinalFlush(
            worker,
            timeout=cfg.flush_timeout,
            clock=self.clock,
            signals=self.wake,
            stops=loop.stops,
            board=self.board,
            reporter=self.reporter,
            lease_lost=lambda: self.lease.error is not None,
        )
        # Recorded from here: a run that failed to restore made no attempt.
        history = self.reporter.history = RunHistory(
            repo.backend,
            self.run_id,
            on_error=console.warn,
            rank=cfg.rank if cfg.world_size > 1 else None,
            earlier=earlier,
        )
        history.start()
        status, flushed = 0, False
        try:
            status = self._supervise(recovery.watcher, control)
        except CkptError as exc:
            history.finish(exc.exit_code, f"error: {exc}")
            history.close(timeout=5.0)
            raise
        except BaseException:
            history.finish(contract.ExitCode.SOFTWARE, "ckpt crashed")
            history.close(timeout=5.0)
            raise
        finally:
            flushed = self._tear_down(recovery, flush, control, guardian, old_handlers)
            shutil.rmtree(runtime, ignore_errors=True)
        return self._end(repo, recovery, flush, status, flushed)

    def _loop_for(self, recovery: Recovery, guardian: Guardian, socket: Path) -> AttemptLoop:
        env = dict(os.environ)
        env.update({contract.ENV_SOCKET: str(socket), contract.ENV_RUN: self.run_id})
        loop = AttemptLoop(
            self.cfg,
            clock=self.clock,
            spawn=self.spawn,
            signals=self.wake,
            between=recovery,
            reporter=self.reporter,
            board=self.board,
            checkpoint=self._send_checkpoint_signal,
            protect=guardian.protect,
            exclude=self._exclude,
            rng=self.rng,
            env=env,
            on_launch=self.checkpoint.pids.clear,
        )
        loop.attempt = self._attempts_before
        return loop

    # ------------------------------------------------------------ supervise

    def _supervise(self, watcher: Watcher, control: ControlServer) -> int:
        """Start the background work, run the attempt loop; its status."""
        cfg, worker, loop = self.cfg, self._worker, self.loop
        assert worker is not None and loop is not None
        worker.start()
        watcher.start()
        control.start()
        self._registered = control_registry.register(
            {
                "socket": str(control.path),
                "dir": str(cfg.dir),
                "remote": redact_url(cfg.remote),
                "run": self.run_id,
                "started": time.time(),
            }
        )
        if console.is_terminal():
            threading.Thread(
                target=live.title_loop,
                args=(self._status, self._stop_watching),
                name="ckpt-title",
                daemon=True,
            ).start()
        if self._poller is not None:
            self._first_poll.wait(FIRST_POLL_WAIT)
        return loop.run()

    def _tear_down(
        self,
        recovery: Recovery,
        flush: FinalFlush,
        control: ControlServer,
        guardian: Guardian,
        old_handlers: dict[int, Any],
    ) -> bool:
        """Stop the background work, flush the final state; True if durable."""
        cfg, worker = self.cfg, recovery.worker
        self._stop_watching.set()
        if self._registered is not None:
            with contextlib.suppress(OSError):
                self._registered.unlink()
        console.title(None)
        recovery.watcher.stop()
        child = self.loop.child if self.loop is not None else None
        if child is not None and child.poll() is None:
            # Only on an unexpected error in the loop.
            child.signal_all(signal.SIGKILL, self._exclude)
        flushed = flush.run()
        self.reporter.ended = True  # its line said how the flush ended: the worker's add nothing
        worker.stop()
        # Retention runs after a snapshot is answered, the final flush's
        # too: it ends before the lease is released (a prune that overlapped
        # another writer's uploads could delete its chunks).
        worker.join(wait_limit(cfg.flush_timeout))  # --flush-timeout inf: no limit
        if flush.abandoned is not None:
            flushed = flush.after_abandon()
        control.close()
        guardian.close()
        self.wake.restore(old_handlers)
        recovery.snapshotter.close()
        return flushed

    # ------------------------------------------------------------ the end

    def _end(
        self, repo: Repository, recovery: Recovery, flush: FinalFlush, status: int, flushed: bool
    ) -> int:
        loop, history, notice = self.loop, self.reporter.history, self.board.notice
        assert loop is not None and history is not None
        self.reporter.summary(loop.attempts, recovery.rollbacks)
        out = outcome(
            status,
            flushed=flushed,
            abandoned=flush.abandoned is not None,
            stop_signal=loop.stops.signal,
            preempted=f"{notice.cloud} {notice.action}" if notice is not None else None,
            display=repo.display,
            directory=str(self.cfg.dir),
        )
        self.reporter.outcome(out.warning, out.error)
        self.reporter.end(out.status, out.word, len(loop.attempts), recovery.worker)
        self.events.close()
        history.finish(out.status, out.word)
        wait = 10.0
        window = self.board.window
        if window is not None:  # the machine is going away: not past its deadline
            wait = window.history_wait(wait, self.clock.monotonic())
        self.reporter.close_history(repo.display, wait)
        return out.status

    # ------------------------------------------------------------ preemption

    def _hibernation(self, notice: preemption.Notice) -> None:
        """(The watcher's thread.) The job is frozen with the machine, not
        lost: ask for a checkpoint and a snapshot, in case it never resumes."""
        self.reporter.hibernation(notice)
        with contextlib.suppress(CkptError):
            self._send_checkpoint_signal()
        worker = self._worker
        if worker is not None:
            worker.request("hibernation")

    # ------------------------------------------------------------ callbacks

    def _send_checkpoint_signal(self) -> list[int]:
        return self.checkpoint.send(self.loop.child if self.loop is not None else None)

    def _running(self) -> set[int]:
        child = self.loop.child if self.loop is not None else None
        return {child.pid} if child is not None and child.exit is None else set()

    def _reaped(self) -> set[int]:
        """What a SIGCHLD must not reap: ckpt's helpers and the running child
        (its own status is Child.poll's)."""
        return self._exclude | self._running()

    def _snapshot_taken(self, result: SnapshotResult) -> None:
        """(The snapshot thread.) Said, and remembered for the crash-loop guard."""
        self.reporter.snapshot(result)
        if result.manifest is not None:
            self.taken.add(result.manifest)

    def _open_scan(self) -> openfiles.OpenScan:
        """(The snapshot thread, when a snapshot is about to be taken.) The
        files below --dir the job's processes hold open for writing: every
        process below ckpt and in the child's group, but ckpt's helpers."""
        child = self.loop.child if self.loop is not None else None
        pgid = child.pgid if child is not None and child.exit is None else None
        procs = processes.live(os.getpid(), pgid=pgid, exclude=self._exclude)
        return openfiles.scan([p.pid for p in procs], self.cfg.dir)

    def _status(self) -> dict[str, Any]:
        child = self.loop.child if self.loop is not None else None
        notice = self.board.notice
        assert self._worker is not None
        return live.status(
            self._worker,
            rate=self.reporter.rate,
            settle_timeout=self.cfg.settle_timeout,
            run=self.run_id,
            attempt=self.attempt,
            child_pid=child.pid if child is not None and child.exit is None else None,
            dir=str(self.cfg.dir),
            remote=redact_url(self.cfg.remote),
            notice=notice.describe() if notice is not None else None,
        )


def _open_repository(cfg: RunConfig) -> Repository:
    """The repository of --remote, this rank's stream of it."""
    private_store_dirs(cfg.remote)
    backend = open_backend(cfg.remote, cfg.storage_options, io_timeout=cfg.io_timeout)
    repo = Repository.open(backend, create=True, stream=rank_stream(cfg.rank, cfg.world_size))
    assert repo is not None
    if cfg.world_size > 1:
        pruner = "this rank prunes" if cfg.rank == 0 else "rank 0 prunes"
        console.info(
            f"{cfg.identity_source}: snapshots in {repo.stream} of the remote, "
            f"chunks shared; {pruner} old snapshots (--keep)"
        )
    return repo


def _runtime_dir() -> Path:
    """A private directory for the control socket."""
    runtime = Path(tempfile.mkdtemp(prefix="ckpt-"))
    if len(str(runtime)) > 90:  # AF_UNIX paths are limited to 107 bytes
        shutil.rmtree(runtime)
        runtime = Path(tempfile.mkdtemp(prefix="ckpt-", dir="/tmp"))
    return runtime


def _snapshotter_for(
    cfg: RunConfig,
    repo: Repository,
    run_id: str,
    patterns: tuple[str, ...],
    may_write: Callable[[], None],
) -> Snapshotter:
    return Snapshotter(
        repo,
        cfg.dir,
        run=run_id,
        patterns=patterns,
        concurrency=cfg.concurrency,
        may_write=may_write,
        rank=cfg.rank,
        world_size=cfg.world_size,
        lease_ttl=cfg.lease_timeout,
        checks=Registry(cfg.checks, builtin=cfg.format_checks),
    )


def _holds_files(directory: Path) -> bool:
    """The directory has a file or link somewhere below it (stops at the first)."""
    for root, dirs, files in os.walk(directory):
        if files or any(os.path.islink(os.path.join(root, d)) for d in dirs):
            return True
    return False
