"""The run loop: restore, launch, watch + snapshot in the background, restart on
recoverable exits, forward signals, flush at the end.

Signal handlers only record: every handled signal is written to a self-pipe by
`signal.set_wakeup_fd`, and the loop reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import secrets
import select
import shlex
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ckpt import _contract as contract
from ckpt_cli import __version__, console, crashloop, openfiles, preemption, subtree
from ckpt_cli import control as control_registry
from ckpt_cli.child import Child, Guardian, catches_signal, ckpt_executable
from ckpt_cli.config import RunConfig, wait_limit
from ckpt_cli.control import ControlServer
from ckpt_cli.costs import attempt_outcome
from ckpt_cli.errors import CkptError, RemoteError, RestoreError, Stopped
from ckpt_cli.events import EventLog
from ckpt_cli.formats import DEFAULT as DEFAULT_CHECKS
from ckpt_cli.formats import Registry
from ckpt_cli.history import RunHistory, attempts_before, changed_at, load_runs
from ckpt_cli.lease import Heartbeat, LeaseLostError
from ckpt_cli.manifest import Manifest, ManifestError
from ckpt_cli.policy import ChildExit, Decision, decide, signal_name
from ckpt_cli.remote import open_backend, redact_url
from ckpt_cli.repair import Repaired, repair_dir
from ckpt_cli.repository import Repository, SnapshotRef, rank_stream
from ckpt_cli.restore import ensure_dir, prepare_rank_dir, restore_into, rollback_target
from ckpt_cli.snapshotter import TEMP_PATTERNS, SnapshotResult, Snapshotter
from ckpt_cli.watcher import Watcher
from ckpt_cli.worker import Request, SnapshotWorker, WaitNews, unreadable_error

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: A stop signal this soon after the first is the same stop delivered twice
#: (GNU timeout signals its command and then its own group, ckpt included), not
#: a second one asking to kill at once.
ECHO_WINDOW = 0.5
FORWARD_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
#: Written to the wake pipe by the preemption watcher (no signal is numbered 0).
NOTICE_WAKE = 0
#: After a preemption notice the child runs on (told to checkpoint, a snapshot
#: under way) for half the window, or less so that at least RESERVE seconds
#: remain; then it is stopped, and the rest goes to its grace and the flush.
NOTICE_SHARE = 0.5
NOTICE_RESERVE = 10.0
#: How long a stopped child may take during a notice window, at most: a third
#: of what is left, so the final flush keeps the rest.
NOTICE_GRACE_SHARE = 1 / 3
#: A final flush that takes longer than this shows its progress (a bar on a
#: terminal, one line off one).
FLUSH_SHOWN = 1.0
#: How long the first launch waits for the first answer of the metadata
#: service (a machine already under notice launches nothing). Azure's first
#: call may take minutes: the launch does not wait for that.
FIRST_POLL_WAIT = 3.0
#: The `end` event's cost fields when the run ended before its history began.
NO_COSTS = {"failures": None, "lost_seconds": None, "resume_seconds": None}
#: Snapshots of this run the crash-loop guard remembers (the newest): a
#: streak has no snapshot taken while its attempts ran, so it needs few.
SNAPS_KEPT = 1000


@dataclasses.dataclass
class Attempt:
    number: int
    exit: ChildExit
    seconds: float


class Supervisor:
    def __init__(self, cfg: RunConfig, *, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.rng = rng or random.Random()
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
        self.patterns = TEMP_PATTERNS + cfg.excludes
        self.attempt = 0
        self.attempts: list[Attempt] = []
        self.child: Child | None = None
        self.restored_id = ""
        self.restored_step: int | None = None
        #: What a kept --dir (newer than the newest snapshot) descends from.
        self._descends_from: tuple[str, int | None] = ("", None)
        self.stop_signal: int | None = None
        self._stop_at = 0.0
        self._flush_abandoned = False
        self._abandoned: tuple[Request, int] | None = None  # the final request, the signal
        self._lease_error: LeaseLostError | None = None
        self._wake_r = self._wake_w = -1
        self._wake_lock = threading.Lock()
        self._warned_links: set[str] = set()
        self._unreadable: dict[str, str] = {}  # files said to be unreadable
        self._signal_pids: set[int] = set()  # the child's processes that handle the signal
        self._exclude: set[int] = set()  # ckpt's own helpers below it (the guardian)
        self._launching = False  # True once the loop's handlers are in: no more Stopped
        self.history: RunHistory | None = None
        self._poller: preemption.Poller | None = None
        self._notice: preemption.Notice | None = None  # set by the watcher thread
        self._notice_at = 0.0  # monotonic time the loop took the notice in
        self._notice_deadline = 0.0  # monotonic time the machine goes away
        self._notice_stop_at: float | None = None  # when the loop stops the child
        self._notice_stopped = False  # the loop stopped the child for the notice
        self._notice_stopped_at = 0.0
        self._stop_watching = threading.Event()
        self._first_poll = threading.Event()
        self._worker: SnapshotWorker | None = None
        self._beats: Heartbeat | None = None  # keeps the lease while it is held
        self.events = EventLog(getattr(cfg, "log_json", None), self.run_id)
        self._rate = 0.0  # bytes/s of the last snapshot that uploaded anything
        self._ended = False  # the final flush and the worker are done: no more reports
        self._said_unverified: set[str] = set()  # files in progress said, once each
        #: The crash-loop guard, the snapshots this run took (what it judges
        #: by), the snapshot it rolled back to (the next launch's CKPT_RESTORED)
        #: and the rollbacks done (for the summary).
        self._guard = crashloop.Guard(cfg.crash_loop)
        self._snaps: list[crashloop.Snap] = []  # the newest SNAPS_KEPT (any thread appends)
        self._snaps_lock = threading.Lock()
        self._rolled_back: Manifest | None = None
        self._rollbacks: list[str] = []

    # ------------------------------------------------------------ entry point

    def run(self) -> int:
        """Restore, supervise, flush; the exit status. ckpt is made a child
        subreaper for the duration (and PID 1 of a container needs exactly
        that): orphans of the job are re-parented to it and reaped."""
        early = self._early_stop_handlers()
        # Where the kernel refuses (not Linux), orphans go to init as usual.
        was_subreaper = subtree.is_subreaper() or not subtree.set_subreaper(True)
        try:
            return self._run_opened()
        except (CkptError, Stopped) as exc:
            # The JSON log ends with an `end` event whatever the way out.
            status = 128 + exc.signum if isinstance(exc, Stopped) else exc.exit_code
            self.events.emit(
                "end",
                status=status,
                outcome=f"error: {exc}" if isinstance(exc, CkptError) else "stopped",
                attempts=len(self.attempts),
                snapshots=None,
                bytes_uploaded=None,
                last_snapshot=None,
                **(self.history.costs() if self.history is not None else NO_COSTS),
            )
            raise
        finally:
            self.events.close()
            if not was_subreaper:
                subtree.set_subreaper(False)
            for sig, handler in early.items():
                signal.signal(sig, handler)

    def _early_stop_handlers(self) -> dict[int, Any]:
        """Until the child is launched a stop signal aborts what is under way
        (raising Stopped). Without a handler, SIGTERM would kill ckpt mid-restore
        and leave its lease held, and PID 1 of a container would ignore it:
        the kernel applies no default action to a namespace's init."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def stop(signum: int, frame: object) -> None:
            if not self._launching:
                raise Stopped(signum)

        return {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}

    def _run_opened(self) -> int:
        cfg = self.cfg
        shown = redact_url(cfg.remote)
        if cfg.remote_is_default:
            console.info(
                f"remote: {shown} (embedded local store; protect against losing this "
                "machine with --remote s3://bucket/prefix or CKPT_REMOTE)"
            )
            if os.getpid() == 1:
                console.warn(
                    "ckpt is PID 1 (of a container?) and the remote is the embedded store "
                    "inside it, which is lost with the container: set --remote or CKPT_REMOTE"
                )
        else:
            console.info(f"remote: {shown}")
        self.events.emit(
            "start",
            remote=shown,
            dir=str(cfg.dir),
            command=cfg.command,
            host=os.uname().nodename,
            pid=os.getpid(),
            version=__version__,
        )
        self._poller = preemption.poller_for(cfg.preemption)
        if self._poller is not None:
            cloud = self._poller.cloud
            how = (
                f"this machine's DMI data says {cloud}"
                if cfg.preemption == "auto"
                else f"--preemption {cloud}"
            )
            console.info(
                f"preemption: watching {self._poller.describe()} ({how}; --preemption off to stop)"
            )
        elif cfg.preemption == "auto":
            console.debug("preemption: DMI data names no cloud here; nothing is polled")
        # From the start: a machine already under notice launches nothing.
        self._start_preemption_watch()
        try:
            backend = open_backend(cfg.remote, cfg.storage_options, io_timeout=cfg.io_timeout)
            stream = rank_stream(cfg.rank, cfg.world_size)
            repo = Repository.open(backend, create=True, stream=stream)
            assert repo is not None
            if cfg.world_size > 1:
                pruner = "this rank prunes" if cfg.rank == 0 else "rank 0 prunes"
                console.info(
                    f"{cfg.identity_source}: snapshots in {repo.stream} of the remote, "
                    f"chunks shared; {pruner} old snapshots (--keep)"
                )
            lease = repo.lease(self.run_id, cfg.lease_timeout)
            took_over = lease.acquire(on_wait=console.info)
            if took_over:
                console.warn(f"took over the lease on {repo.display}: {took_over}")
            # Beating from here on: a restore may take longer than the ttl.
            self._beats = Heartbeat(lease, on_lost=self._lost_lease, on_error=console.warn)
            try:
                with self._beats:
                    return self._run_holding(repo)
            finally:
                lease.release()
        finally:
            self._stop_watching.set()

    def _run_holding(self, repo: Repository) -> int:
        cfg = self.cfg
        earlier: list[dict[str, Any]] = []
        try:
            earlier = load_runs(repo.backend)
            self.attempt = attempts_before(earlier, exclude=self.run_id, rank=cfg.rank)
        except RemoteError as exc:
            console.warn(f"run history not read ({exc}): CKPT_ATTEMPT counts this run only")
        snapshotter = Snapshotter(
            repo,
            cfg.dir,
            run=self.run_id,
            patterns=self.patterns,
            concurrency=cfg.concurrency,
            may_write=self._check_lease,
            rank=cfg.rank,
            world_size=cfg.world_size,
            lease_ttl=cfg.lease_timeout,
            checks=Registry(cfg.checks, builtin=cfg.format_checks),
        )
        self.restored_id, self.restored_step = self._prepare(
            repo, snapshotter, restore_enabled=cfg.restore, snapshot=cfg.snapshot
        )
        parent = snapshotter.parent
        if not self.restored_id and cfg.restore and cfg.world_size == 1 and parent is not None:
            # A --dir newer than the newest snapshot was kept (restore's rule):
            # it descends from that snapshot, the parent of its next one, and
            # the child is told so, as after a relaunch (CKPT_RESTORED).
            self._descends_from = (parent.id, parent.step)
        ensure_dir(cfg.dir)
        if self.restored_id:
            ref = repo.find(self.restored_id)
            self.events.emit(
                "restore",
                snapshot=self.restored_id,
                generation=ref.generation if ref else None,
            )
        else:
            self.events.emit("fresh", reason="nothing restored")

        worker = SnapshotWorker(
            snapshotter,
            debounce=cfg.debounce,
            rescan=cfg.rescan,
            keep=cfg.keep,
            attempt=lambda: self.attempt,
            on_snapshot=self._report_snapshot,
            on_error=self._report_error,
            on_recovered=self._report_recovered,
            on_prune_error=lambda message: console.warn(
                f"retention failed: {message}; older snapshots stay until the next "
                "snapshot's retention removes them"
            ),
            commit_only=cfg.snapshots == "commit",
            settle=cfg.settle_timeout,
            open_scan=self._open_scan,
            on_wait=self._report_wait,
        )
        runtime = Path(tempfile.mkdtemp(prefix="ckpt-"))
        if len(str(runtime)) > 90:  # AF_UNIX paths are limited to 107 bytes
            shutil.rmtree(runtime)
            runtime = Path(tempfile.mkdtemp(prefix="ckpt-", dir="/tmp"))
        control = ControlServer(
            runtime / "control.sock",
            worker,
            lambda: self._status(worker),
            hello=self._hello,
            send_signal=self._send_checkpoint_signal,
        )
        watcher = Watcher(cfg.dir, worker.changed, self.patterns)
        guardian = Guardian()
        self._exclude = {guardian.pid}
        old_handlers = self._install_signals()
        self._launching = True  # when the early handlers come back, they only ignore
        self._worker = worker
        registered: Path | None = None
        status = 0
        flushed = False
        # Recorded from here: a run that failed to restore made no attempt.
        history = self.history = RunHistory(
            repo.backend,
            self.run_id,
            on_error=console.warn,
            rank=cfg.rank if cfg.world_size > 1 else None,
            earlier=earlier,
        )
        history.start()
        try:
            worker.start()
            watcher.start()
            control.start()
            registered = control_registry.register(
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
                    target=self._title_loop,
                    args=(worker, self._stop_watching),
                    name="ckpt-title",
                    daemon=True,
                ).start()
            status = self._loop(repo, snapshotter, worker, watcher, guardian, control.path)
        except CkptError as exc:
            history.finish(exc.exit_code, f"error: {exc}")
            history.close(timeout=5.0)
            raise
        except BaseException:
            history.finish(contract.ExitCode.SOFTWARE, "ckpt crashed")
            history.close(timeout=5.0)
            raise
        finally:
            self._stop_watching.set()
            if registered is not None:
                with contextlib.suppress(OSError):
                    registered.unlink()
            console.title(None)
            watcher.stop()
            if self.child is not None and self.child.poll() is None:
                # Only on an unexpected error in the loop.
                self.child.signal_all(signal.SIGKILL, self._exclude)
            flushed = self._final_flush(worker)
            self._ended = True  # its line said how the flush ended: the worker's add nothing
            worker.stop()
            # Retention runs after a snapshot is answered, the final flush's
            # too: it ends before the lease is released (a prune that overlapped
            # another writer's uploads could delete its chunks).
            worker.join(wait_limit(cfg.flush_timeout))  # --flush-timeout inf: no limit
            if self._flush_abandoned:
                flushed = self._after_abandon(worker)
            control.close()
            guardian.close()
            self._restore_signals(old_handlers)
            snapshotter.close()
            shutil.rmtree(runtime, ignore_errors=True)
        self._summary(worker)
        status, outcome = self._outcome(repo, status, flushed)
        last = worker.stats.last_durable
        self.events.emit(
            "end",
            status=status,
            outcome=outcome,
            attempts=len(self.attempts),
            snapshots=worker.stats.snapshots,
            bytes_uploaded=worker.stats.bytes_uploaded,
            last_snapshot=last.id if last else None,
            **history.costs(),
        )
        self.events.close()
        history.finish(status, outcome)
        wait = 10.0
        if self._notice_at:  # the machine is going away: not past its deadline
            wait = min(wait, max(1.0, self._notice_deadline - time.monotonic()))
        if not history.close(timeout=wait) and not history.failure_reported:
            # Said once: not again when the writer already said it cannot write.
            console.warn(
                f"the run history in {repo.display} misses this run's end: {history.failure}"
                if history.failure
                else f"the run history in {repo.display} misses this run's end"
            )
        return status

    def _outcome(self, repo: Repository, status: int, flushed: bool) -> tuple[int, str]:
        """The exit status and a word for the run history."""
        cfg = self.cfg
        notice = self._notice
        if notice is not None and status != 0:
            if flushed:
                console.warn(
                    f"preempted ({notice.cloud} {notice.action}): the final state is durable; "
                    f"run `ckpt run` again on another machine to go on "
                    f"(exit {int(contract.ExitCode.PREEMPTED)})"
                )
            else:
                console.error(
                    f"preempted ({notice.cloud} {notice.action}) before the final state was "
                    f"durable in {repo.display}; the newest durable snapshot is what a new run "
                    f"restores (exit {int(contract.ExitCode.PREEMPTED)})"
                )
            return contract.ExitCode.PREEMPTED, "preempted"
        if self.stop_signal is not None:
            if flushed or self._flush_abandoned:
                return 128 + self.stop_signal, "stopped"
            console.error(
                f"stopped by {signal_name(self.stop_signal)}, but the final state is not "
                f"durable in {repo.display}; the local directory {cfg.dir} still has it"
            )
            return contract.ExitCode.UNAVAILABLE, "not durable"
        if status == 0 and not flushed:
            console.error(
                "the child succeeded but its final state is not durable in "
                f"{repo.display}; the local directory {cfg.dir} still has it"
            )
            return contract.ExitCode.UNAVAILABLE, "not durable"
        return status, "succeeded" if status == 0 else "failed"

    # ------------------------------------------------------------ restore phase

    # ------------------------------------------------------------ the loop

    def _loop(
        self,
        repo: Repository,
        snapshotter: Snapshotter,
        worker: SnapshotWorker,
        watcher: Watcher,
        guardian: Guardian,
        socket_path: Path,
    ) -> int:
        cfg = self.cfg
        retries_used = 0
        history = self.history
        assert history is not None
        if self._poller is not None:
            self._first_poll.wait(FIRST_POLL_WAIT)
        while True:
            if self._preempted():  # came before or between attempts: no new one
                self._note_notice(" between attempts" if self.attempts else " before the launch")
                return contract.ExitCode.PREEMPTED
            self.attempt += 1
            durable = worker.stats.last_durable
            restored, step = self.restored_id, self.restored_step
            if not restored:
                restored, step = self._descends_from
            if durable and self.attempts:
                restored, step = durable.id, durable.step
            if self._rolled_back is not None:  # the crash-loop guard restored this one
                restored, step = self._rolled_back.id, self._rolled_back.step
                self._rolled_back = None
            if self.attempts and cfg.world_size > 1:
                # Every rank relaunches from the same step: the newest one all
                # ranks committed, not this rank's own newest state.
                worker.request("exit").wait(wait_limit(cfg.flush_timeout))
                watcher.stop()
                try:
                    held, held_step = self._prepare(repo, snapshotter)
                finally:
                    watcher.start()
                if held:  # "" : the dir was kept as the attempt left it (auto mode)
                    restored, step = held, held_step
            env = dict(os.environ)
            env.update(
                {
                    contract.ENV_DIR: str(cfg.dir),
                    contract.ENV_ATTEMPT: str(self.attempt),
                    contract.ENV_RESTORED: restored,
                    contract.ENV_SOCKET: str(socket_path),
                    contract.ENV_RUN: self.run_id,
                    contract.ENV_RANK: str(cfg.rank),
                    contract.ENV_WORLD_SIZE: str(cfg.world_size),
                    contract.ENV_RESTORED_STEP: "" if step is None else str(step),
                    contract.ENV_CHECKPOINT_SIGNAL: signal_name(cfg.checkpoint_signal),
                    contract.ENV_BIN: ckpt_executable(),
                }
            )
            self._signal_pids.clear()
            console.debug(
                "child env: "
                + " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("CKPT_"))
            )
            history.attempt_started(self.attempt, resumed=restored)
            launched = time.time()
            child = Child(cfg.command, env)
            self.child = child
            guardian.protect(child.pgid)
            console.info(
                f"attempt {self.attempt}: started {shlex.join(cfg.command)} (pid {child.pid})"
            )
            self.events.emit("launch", attempt=self.attempt, pid=child.pid)
            ex = self._wait(child, watcher, worker)
            exited = time.time()
            if left := child.stop_leftovers(min(cfg.grace, 10.0), self._exclude):
                console.info(
                    f"stopped {console.plural(left, 'process', 'processes')} the child left behind"
                )
            guardian.protect(0)
            if ex.status != 0:
                # Before any snapshot of what it left, and before a relaunch:
                # the files it left torn are put back from their newest whole
                # version (the torn ones are kept, never deleted).
                self._repair(repo, snapshotter)
            elapsed = time.monotonic() - child.started
            self.attempts.append(Attempt(self.attempt, ex, elapsed))
            history.attempt_ended(
                self.attempt,
                ex.status,
                ex.describe(),
                elapsed,
                ended=exited,
                outcome=attempt_outcome(
                    ex.status, preempted=self._preempted(), stopped=self.stop_signal is not None
                ),
            )
            self.events.emit(
                "exit",
                attempt=self.attempt,
                status=ex.status,
                description=ex.describe(),
                seconds=round(elapsed, 3),
            )
            console.info(f"attempt {self.attempt}: {ex.describe()} after {elapsed:.1f}s")
            if self._preempted():
                # The machine is going away: no relaunch here, and no retry spent.
                # Done on its own (not stopped by us or the OS): done.
                done = ex.status == 0 and self.stop_signal is None
                return 0 if done else contract.ExitCode.PREEMPTED
            if self.stop_signal is not None:
                return 128 + self.stop_signal
            decision = decide(ex, retries_used, cfg.retries, cfg.retry_on)
            if decision is Decision.SUCCESS:
                return 0
            if decision is Decision.FATAL:
                self.events.emit("give_up", status=ex.status, reason="not retried (--retry-on)")
                console.error(
                    f"child failed with {ex.describe()}, which is not retried "
                    "(--retry-on); passing it on"
                )
                return ex.status
            if decision is Decision.EXHAUSTED:
                self.events.emit("give_up", status=ex.status, reason="retries spent (--retries)")
                spent = (
                    "no retry allowed"
                    if not cfg.retries
                    else (
                        "its one retry spent"
                        if cfg.retries == 1
                        else f"all {cfg.retries} retries spent"
                    )
                )
                console.error(f"giving up: {ex.describe()} and {spent} (--retries)")
                return ex.status
            retries_used += 1
            loop = self._guard.ended(
                attempt=self.attempt,
                started_from=restored,
                launched=launched,
                exited=exited,
                failed=True,
                status=ex.describe(),
                snaps=self._taken(),
            )
            if loop is not None:
                self._roll_back(repo, snapshotter, worker, watcher, loop)
            else:
                worker.request("exit")  # protect what the attempt left while we back off
            delay = cfg.backoff.delay(retries_used, self.rng)
            self.events.emit(
                "retry",
                attempt=self.attempt,
                retry=retries_used,
                retries=cfg.retries,
                delay=round(delay, 3),
            )
            console.info(
                f"recoverable ({ex.describe()}): retry {retries_used}/{cfg.retries} in {delay:.1f}s"
            )
            if self._sleep(delay):
                if self._preempted():
                    return contract.ExitCode.PREEMPTED
                return 128 + (self.stop_signal or signal.SIGTERM)
            if not cfg.dir.is_dir():
                console.warn(f"{cfg.dir} disappeared: restoring it before the retry")
                watcher.stop()
                self.restored_id = restore_into(repo, snapshotter, None, cfg.concurrency)
                ensure_dir(cfg.dir)
                watcher.start()

    def _prepare(
        self,
        repo: Repository,
        snapshotter: Snapshotter,
        *,
        restore_enabled: bool = True,
        snapshot: str | None = None,
    ) -> tuple[str, int | None]:
        """Bring --dir to what this run's child starts from (restore's rule)."""
        cfg = self.cfg
        return prepare_rank_dir(
            repo,
            snapshotter,
            rank=cfg.rank,
            world_size=cfg.world_size,
            allow_change=cfg.allow_world_change,
            restore_enabled=restore_enabled,
            snapshot=snapshot,
            concurrency=cfg.concurrency,
            on_repair=self._report_repair,
        )

    # ------------------------------------------------------------ after a failure

    def _repair(self, repo: Repository, snapshotter: Snapshotter) -> None:
        """Put back the files a failed attempt left torn (repair.repair_dir)."""
        done = repair_dir(
            repo,
            self.cfg.dir,
            self.patterns,
            parent=snapshotter.parent,
            warn=console.warn,
            registry=snapshotter.checks or DEFAULT_CHECKS,
        )
        if not done.empty:
            self._report_repair(done)

    def _taken(self) -> list[crashloop.Snap]:
        """The snapshots this run took (the newest SNAPS_KEPT), oldest first."""
        with self._snaps_lock:
            return list(self._snaps)

    def _report_repair(self, done: Repaired) -> None:
        self.events.emit("repair", **done.event())

    def _roll_back(
        self,
        repo: Repository,
        snapshotter: Snapshotter,
        worker: SnapshotWorker,
        watcher: Watcher,
        loop: crashloop.Verdict,
    ) -> None:
        """The crash-loop guard fired: mark the snapshot the failing attempts
        started from (and the snapshots their exits made) suspect, and
        restore the snapshot before it for the next attempt."""
        cfg = self.cfg
        # What the failures left, snapshotted first: nothing local is lost,
        # and the snapshot it makes is as suspect as the rest.
        req = worker.request("exit")
        req.wait(wait_limit(cfg.flush_timeout))
        ids = list(loop.suspect)
        failed = ", ".join(map(str, loop.attempts))
        try:
            base = repo.find(ids[0])
            made = req.manifest
            # Made by this request: the newest this run took, and newer than S.
            taken = self._taken()
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
                return
            target = rollback_target(repo, base, {r.key for r in refs})
        except RemoteError as exc:
            console.warn(f"crash loop: attempts {failed} failed; no rollback ({exc})")
            return
        name = f"{base.id} (generation {base.generation})"
        if target is None:
            console.warn(
                f"crash loop: attempts {failed} failed ({', '.join(loop.statuses)}) right after "
                f"a restore of snapshot {name}, and no snapshot before it is left to roll "
                "back to: relaunching on it"
            )
            return
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
            f"CRASH LOOP: attempts {failed} failed ({', '.join(loop.statuses)}) right after "
            f"a restore of snapshot {name}, before any newer snapshot: marked it suspect in "
            f"{repo.display}{also}; rolling back to snapshot {target.id} (generation "
            f"{target.generation}). `ckpt unsuspect {repo.display} {base.id}` clears the "
            f"mark (--crash-loop {cfg.crash_loop}; 0 turns the guard off)"
        )
        self.events.emit(
            "rollback",
            snapshot=base.id,
            generation=base.generation,
            marked=[r.id for r in refs],
            to=target.id,
            to_generation=target.generation,
            attempts=list(loop.attempts),
            statuses=list(loop.statuses),
        )
        self._rollbacks.append(f"{base.id} -> {target.id}")
        if self.history is not None:
            self.history.rolled_back(
                {"from": base.id, "to": target.id, "attempts": list(loop.attempts)}
            )
        if cfg.world_size > 1 and _step_of(repo, base) is not None:
            return  # the relaunch restores the step before it on every rank (_prepare)
        watcher.stop()
        try:
            held = restore_into(repo, snapshotter, None, cfg.concurrency)
        except (RestoreError, RemoteError) as exc:
            console.warn(
                f"the rollback's restore failed ({exc}): relaunching on {cfg.dir} as it is"
            )
            return
        finally:
            ensure_dir(cfg.dir)
            watcher.start()
        if held and snapshotter.parent is not None and snapshotter.parent.id == held:
            self._rolled_back = snapshotter.parent

    def _wait(self, child: Child, watcher: Watcher, worker: SnapshotWorker) -> ChildExit:
        cfg = self.cfg
        kill_at: float | None = None
        if self._notice is not None and not self._notice_stop_at:
            self._take_notice(worker)  # it came before this attempt started
        while True:
            ex = child.poll()
            if ex is not None:
                return ex
            watcher.ensure()
            now = time.monotonic()
            wake_at = [now + 1.0]
            if kill_at is not None:
                wake_at.append(kill_at)
            if self._notice_stop_at is not None and self.stop_signal is None:
                wake_at.append(self._notice_stop_at)
            timeout = max(0.0, min(wake_at) - now)
            for sig in self._signals(timeout):
                if sig == NOTICE_WAKE:
                    self._take_notice(worker)
                    if kill_at is not None:  # a stop came first: its grace, capped
                        kill_at = min(kill_at, time.monotonic() + self._grace())
                elif sig in STOP_SIGNALS:
                    first = self.stop_signal is None
                    if self._stop_after_notice_stop(sig, "the child is already being stopped"):
                        continue
                    if not self._note_stop(sig):
                        if not first:
                            continue  # the first stop, delivered twice
                        child.signal_all(sig, self._exclude)
                        grace = self._grace()
                        kill_at = time.monotonic() + grace
                        console.info(
                            f"received {signal_name(sig)}: forwarded to the child; "
                            f"SIGKILL in {grace:g}s unless it exits (--grace)"
                        )
                    else:
                        console.warn(f"received {signal_name(sig)} again: killing the child now")
                        child.signal_all(signal.SIGKILL, self._exclude)
                        kill_at = None
                elif sig == cfg.checkpoint_signal:
                    # Only to the processes that handle it: its default action kills.
                    try:
                        self._send_checkpoint_signal()
                    except CkptError as exc:
                        console.warn(f"received {signal_name(sig)}, not passed on: {exc}")
                elif sig in FORWARD_SIGNALS:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, sig)  # the direct child, like tini without -g
            stop_at = self._notice_stop_at
            if (
                stop_at is not None
                and self.stop_signal is None
                and time.monotonic() >= stop_at
                and child.poll() is None
            ):
                # The notice's own stop, as if the OS had sent SIGTERM now.
                self._note_stop(signal.SIGTERM)
                self._notice_stopped, self._notice_stopped_at = True, self._stop_at
                child.signal_all(signal.SIGTERM, self._exclude)
                grace = self._grace()
                kill_at = time.monotonic() + grace
                console.warn(
                    f"preemption: stopping the child now (SIGTERM; SIGKILL in {grace:.0f}s) "
                    "so that its final state is durable before the machine goes away"
                )
            if kill_at is not None and time.monotonic() >= kill_at and child.poll() is None:
                console.warn(
                    f"child still running after {signal_name(self.stop_signal or 0)} and its "
                    "grace period (--grace): SIGKILL"
                )
                child.signal_all(signal.SIGKILL, self._exclude)
                kill_at = None

    # ------------------------------------------------------------ preemption

    def _start_preemption_watch(self) -> None:
        poller = self._poller
        if poller is None:
            return

        def on_notice(notice: preemption.Notice) -> None:
            if not notice.final:
                self._hibernation(notice)
                return
            self._notice = notice
            # Under the lock: once the loop closed the pipe, its fd number may
            # belong to something else by now.
            with self._wake_lock:
                if self._wake_w >= 0:
                    with contextlib.suppress(OSError):
                        os.write(self._wake_w, bytes([NOTICE_WAKE]))

        def on_error(message: str) -> None:
            console.warn(f"preemption notices: {message}; still polling")

        threading.Thread(
            target=poller.watch,
            args=(self._stop_watching, on_notice, on_error, self._first_poll),
            name="ckpt-preemption",
            daemon=True,
        ).start()

    def _hibernation(self, notice: preemption.Notice) -> None:
        """(The watcher's thread.) The job is frozen with the machine, not
        lost: ask for a checkpoint and a snapshot, in case it never resumes."""
        console.warn(
            f"preemption notice: {notice.describe()}: the job is frozen with the instance "
            "and goes on when it resumes; checkpointing now in case it does not"
        )
        with contextlib.suppress(CkptError):
            self._send_checkpoint_signal()
        worker = self._worker
        if worker is not None:
            worker.request("hibernation")

    def _take_notice(self, worker: SnapshotWorker) -> None:
        """The machine is going away: tell the child to checkpoint, snapshot
        now, and plan the child's stop so the final flush ends in time."""
        window = self._note_notice()
        if window is None:
            return
        now = self._notice_at
        reserve = max(NOTICE_RESERVE, window * NOTICE_SHARE)
        self._notice_stop_at = now + max(0.0, window - reserve)
        try:
            self._send_checkpoint_signal()
        except CkptError as exc:
            console.info(f"{exc}; snapshotting what is on disk")
        worker.debounce = min(worker.debounce, 0.5)  # the child's save, snapshotted at once
        worker.request("preemption")
        if self.stop_signal is None and self._notice_stop_at - now >= 1:
            console.info(
                f"preemption: the child is stopped in {self._notice_stop_at - now:.0f}s; "
                "no relaunch on this machine"
            )

    def _preempted(self) -> bool:
        """A notice came (the watcher thread sets it at any time)."""
        return self._notice is not None

    def _note_notice(self, context: str = "") -> float | None:
        """Take in a notice the watcher delivered (once): its deadline on our
        clock, a line, the run history. The window in seconds, or None if there
        is no new notice."""
        notice = self._notice
        if notice is None or self._notice_at:
            return None
        left = notice.seconds_left()
        window = preemption.GCP_WINDOW if left is None else max(0.0, left)
        self._notice_at = time.monotonic()
        self._notice_deadline = self._notice_at + window
        console.warn(f"preemption notice{context}: {notice.describe()}")
        record = dataclasses.asdict(notice)  # cloud, action, deadline, detail
        self.events.emit("preemption", **record)
        if self.history is not None:
            self.history.preempted(record)
        return window

    def _grace(self) -> float:
        """--grace, cut short during a notice window so the flush keeps time."""
        if not self._notice_at:
            return self.cfg.grace
        left = self._notice_deadline - time.monotonic()
        return max(0.0, min(self.cfg.grace, left * NOTICE_GRACE_SHARE))

    def _sleep(self, seconds: float) -> bool:
        """Back off; True if a stop signal arrived meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            for sig in self._signals(min(left, 1.0)):
                if sig == NOTICE_WAKE and self._note_notice(" while backing off") is not None:
                    return True
                if sig in STOP_SIGNALS:
                    self._note_stop(sig)
                    console.info(f"received {signal_name(sig)} while backing off: stopping")
                    return True
        return False

    def _stop_after_notice_stop(self, sig: int, doing: str) -> bool:
        """The first stop signal after ckpt stopped the child for a notice (the
        OS shutting down) asks for nothing more: no SIGKILL at once, no second
        SIGTERM, no abandoned flush. True if sig was that one (recorded)."""
        if not self._notice_stopped or self._stop_at != self._notice_stopped_at:
            return False
        self.stop_signal, self._stop_at = sig, time.monotonic()
        console.info(f"received {signal_name(sig)} after the preemption notice: {doing}")
        return True

    def _note_stop(self, sig: int) -> bool:
        """Record a stop signal; True if it is a second stop, asking to hurry
        (kill the child now, abandon the final flush). The first one, and the
        same stop delivered again within ECHO_WINDOW, are not."""
        now = time.monotonic()
        if self.stop_signal is None:
            self.stop_signal, self._stop_at = sig, now
            self.events.emit("stop", signal=signal_name(sig))
            return False
        return now - self._stop_at >= ECHO_WINDOW

    def _final_flush(self, worker: SnapshotWorker) -> bool:
        """Snapshot the final state and wait until it is durable, retrying until
        --flush-timeout. A first stop signal lets it finish (flushing is what a
        stop asks for); a second one abandons it: no retry, no more waiting
        here. The snapshot thread still ends what it has begun (an upload is
        never cut short: the join after this bounds it), and `_after_abandon`
        then says what became durable. A wait longer than FLUSH_SHOWN shows
        its progress (`console.Progress`)."""
        with contextlib.ExitStack() as shown:
            return self._flush(worker, shown)

    def _flush(self, worker: SnapshotWorker, shown: contextlib.ExitStack) -> bool:
        deadline = time.monotonic() + self.cfg.flush_timeout
        show_at = time.monotonic() + FLUSH_SHOWN
        bar: console.Progress | None = None
        pause = 0.5
        while True:
            req = worker.request("final")
            while not req.wait(0.05):
                if bar is None and time.monotonic() >= show_at:
                    bar = shown.enter_context(console.Progress(self._flush_line()))
                live = worker.snapshotter.live
                if bar is not None and live is not None:
                    bar.update(live[0].bytes_read, live[2])
                if self._notice_at:
                    # Past the notice's deadline the machine is gone; try a
                    # little beyond it anyway: the notice's clock is not ours.
                    deadline = min(deadline, max(self._notice_deadline, self._notice_at) + 5.0)
                if time.monotonic() >= deadline:
                    self._not_durable(
                        worker, f"not durable after {self.cfg.flush_timeout:g}s (--flush-timeout)"
                    )
                    return False
                for sig in self._signals(0):
                    if sig == NOTICE_WAKE:
                        self._note_notice(" during the final flush")  # bounds it
                    if sig not in STOP_SIGNALS:
                        continue
                    if self._stop_after_notice_stop(sig, "finishing the final snapshot"):
                        continue
                    first = self.stop_signal is None
                    if self._note_stop(sig):
                        self._flush_abandoned = True
                        self._abandoned = (req, sig)
                        console.warn(
                            f"received {signal_name(sig)} again: the final flush is abandoned "
                            "(no retry); an upload under way is let finish (at most "
                            "--flush-timeout), then ckpt exits"
                        )
                        return False
                    if first:
                        console.info(
                            f"received {signal_name(sig)}: finishing the final snapshot "
                            "first (a second signal abandons it)"
                        )
            if req.error is None:
                m = req.manifest
                if m is not None:
                    console.info(f"final state is durable as snapshot {m.id}")
                return True
            if (
                not req.retryable
                or self._lease_error is not None
                or time.monotonic() + pause >= deadline
            ):
                self._not_durable(worker, f"failed: {req.error}")
                return False
            time.sleep(pause)
            pause = min(pause * 2, 5.0)

    def _flush_line(self) -> str:
        timeout = self.cfg.flush_timeout
        limit = (
            "as long as it takes (--flush-timeout inf)"
            if wait_limit(timeout) is None
            else f"at most {timeout:g}s (--flush-timeout)"
        )
        return f"waiting for the final snapshot to be durable, {limit}"

    def _after_abandon(self, worker: SnapshotWorker) -> bool:
        """Once the snapshot thread has stopped: what the abandoned flush left
        durable, said once. True if the final state is durable after all
        (its upload was under way and finished)."""
        if self._abandoned is None:
            return False
        req, sig = self._abandoned
        if req.done and req.error is None:
            m = req.manifest
            if m is not None:
                console.info(
                    f"final state is durable as snapshot {m.id} (its upload was under way)"
                )
            return True
        self._not_durable(worker, f"abandoned on {signal_name(sig)}")
        return False

    def _not_durable(self, worker: SnapshotWorker, why: str) -> None:
        last = worker.stats.last_durable
        newest = f"newest durable snapshot is {last.id}" if last else "nothing is durable yet"
        console.error(f"final snapshot {why}; {newest}")

    # ------------------------------------------------------------ signals

    def _install_signals(self) -> dict[int, Any]:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wake_r, self._wake_w = r, w
        old: dict[int, Any] = {}
        for sig in {*STOP_SIGNALS, *FORWARD_SIGNALS, self.cfg.checkpoint_signal, signal.SIGCHLD}:
            old[sig] = signal.signal(sig, _record)
        old[-1] = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        return old

    def _restore_signals(self, old: dict[int, Any]) -> None:
        signal.set_wakeup_fd(old.pop(-1))
        for sig, handler in old.items():
            signal.signal(sig, handler)
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    def _signals(self, timeout: float) -> list[int]:
        """Wait up to timeout for signals; return those received. A SIGCHLD is
        not returned: it reaps the orphans re-parented to ckpt."""
        ready, _, _ = select.select([self._wake_r], [], [], timeout)
        if not ready:
            return []
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return []
        if signal.SIGCHLD in data:
            child = self.child
            running = {child.pid} if child is not None and child.exit is None else set()
            subtree.reap(self._exclude | running)  # the child's own status is Child.poll's
        return [s for s in data if s != signal.SIGCHLD]

    # ------------------------------------------------------------ background

    def _lost_lease(self, exc: LeaseLostError) -> None:
        """The heartbeat found the lease taken: no snapshot is written from now on."""
        self._lease_error = exc
        console.error(str(exc))

    def _hello(self, pid: int, signame: str) -> None:
        """A process of the child installed a handler for the checkpoint signal
        (several may: one per rank of a multi-process job)."""
        self._signal_pids.add(pid)

    def _send_checkpoint_signal(self) -> list[int]:
        """Send --checkpoint-signal to every live process of the child (its group,
        or below ckpt) that registered through the shim, and to the direct child if it catches the
        signal itself (its own handler, a bash trap); CkptError if none does:
        the default action of SIGUSR1 would kill an unprepared child."""
        child = self.child
        sig = self.cfg.checkpoint_signal
        name = signal_name(sig)
        if child is None or child.poll() is not None:
            raise CkptError("no child is running")
        targets = set(self._signal_pids)
        if catches_signal(child.pid, sig):
            targets.add(child.pid)
        # A registered pid is signalled only while it is the child's: in its
        # group, or below ckpt in a session of its own (torchrun starts every
        # worker so); never a recycled pid of some other process.
        ours = {p.pid for p in subtree.live(os.getpid(), pgid=child.pgid, exclude=self._exclude)}
        sent = []
        for pid in sorted(targets & ours):
            try:
                os.kill(pid, self.cfg.checkpoint_signal)
                sent.append(pid)
            except ProcessLookupError:
                continue
        if not sent:
            raise CkptError(
                f"the child has not installed a {name} handler (call ckpt.checkpoint() or "
                f"ckpt.on_preemption() in the script); not sent, it would kill the child"
            )
        pids = f"{'pid' if len(sent) == 1 else 'pids'} {', '.join(map(str, sent))}"
        console.info(f"sent {name} to the child ({pids}): checkpoint soon")
        return sent

    def _check_lease(self) -> None:
        """Before a manifest is written (Heartbeat.check): never over a newer
        writer's state, also after this run was frozen."""
        if self._lease_error is not None:
            raise self._lease_error
        if self._beats is not None:
            self._beats.check()

    def _open_scan(self) -> openfiles.OpenScan:
        """(The snapshot thread, when a snapshot is about to be taken.) The
        files below --dir the job's processes hold open for writing: every
        process below ckpt and in the child's group, but ckpt's helpers."""
        child = self.child
        pgid = child.pgid if child is not None and child.exit is None else None
        procs = subtree.live(os.getpid(), pgid=pgid, exclude=self._exclude)
        return openfiles.scan([p.pid for p in procs], self.cfg.dir)

    def _report_wait(self, news: WaitNews) -> None:
        """A snapshot waits for files in progress (said once it waited a few
        seconds, and again when what it waits for changes), no longer waits,
        or gave up waiting (the snapshot's own report names the files)."""
        if self._ended:
            return
        files = [{"path": p, "reason": r} for p, r in sorted(news.files.items())]
        self.events.emit(
            "snapshot_waiting", state=news.kind, files=files, seconds=round(news.seconds, 3)
        )
        if news.kind == "waiting":
            last = self._worker.stats.last_durable if self._worker is not None else None
            stays = f"snapshot {last.id} stays the newest" if last else "no snapshot yet"
            console.info(
                f"snapshot waits for {_files_in_progress(news.files)}: {stays} "
                f"(at most {self.cfg.settle_timeout:g}s, --settle-timeout)"
            )
        elif news.kind == "done":
            console.info(
                f"snapshot no longer waits ({', '.join(sorted(news.files)[:3])} whole "
                f"after {news.seconds:.0f}s)"
            )
        else:
            self._said_unverified |= set(news.files)
            console.warn(
                f"snapshot waited {news.seconds:.0f}s (--settle-timeout) and is taken anyway, "
                f"unverified: {_files_in_progress(news.files, 5)} (a restore prefers the "
                "newest verified snapshot)"
            )

    def _report_unverified(self, m: Manifest) -> None:
        """A snapshot written with files in progress (the final one, or one
        naming a torn file left as it is, which keeps every later snapshot
        unverified until it is rewritten or removed): each file and why, once
        per file."""
        fresh = {p: r for p, r in m.unverified if p not in self._said_unverified}
        self._said_unverified = {p for p, _ in m.unverified}
        if fresh:
            console.warn(
                f"snapshot {m.id} is unverified: {_files_in_progress(fresh, 5)} "
                "(a restore prefers the newest verified snapshot)"
            )

    def _report_snapshot(self, result: SnapshotResult) -> None:
        new_links = [p for p in result.skipped_links if p not in self._warned_links]
        if new_links:
            self._warned_links.update(new_links)
            console.warn(
                "symlinks that lead out of --dir are not snapshotted: "
                + ", ".join(new_links[:5])
                + (" ..." if len(new_links) > 5 else "")
            )
        if result.unstable:
            shown = ", ".join(result.unstable[:3]) + (" ..." if len(result.unstable) > 3 else "")
            console.warn(f"changed while being read, kept at their previous version: {shown}")
        # Said once while a file stays unreadable for the same reason.
        fresh = {p: w for p, w in result.unreadable.items() if self._unreadable.get(p) != w}
        self._unreadable = dict(result.unreadable)
        if fresh:
            m = result.manifest or result.parent
            console.warn(unreadable_error(fresh, f"snapshot {m.id}" if m else "the snapshot"))
        m = result.manifest
        if m is None:
            parent = result.parent
            if result.waiting:
                console.debug(
                    f"snapshot held back: {_files_in_progress(result.waiting)} in progress"
                )
                return
            console.debug(
                f"nothing changed since snapshot {parent.id if parent else '(none)'}: no snapshot"
            )
            return
        if result.new_bytes and result.seconds > 0:
            self._rate = result.new_bytes / result.seconds
        if self.history is not None:  # its state is the moment ckpt began reading it
            changed = changed_at(m.entries, result.parent.entries if result.parent else None)
            self.history.snapshot_taken(m.id, m.attempt, time.time() - result.seconds, changed)
        with self._snaps_lock:
            self._snaps.append(crashloop.Snap(m.id, m.generation, m.created, m.reason))
            del self._snaps[:-SNAPS_KEPT]
        self.events.emit(
            "snapshot",
            snapshot=m.id,
            generation=m.generation,
            files=len(m.files),
            bytes=m.total_size,
            new_bytes=result.new_bytes,
            seconds=round(result.seconds, 3),
            reason=m.reason,
            verified=m.verified,
            unverified=[{"path": p, "reason": r} for p, r in m.unverified],
        )
        console.info(
            f"snapshot {m.id} (generation {m.generation}): {console.plural(len(m.files), 'file')}, "
            f"{console.fmt_bytes(m.total_size)}, {console.fmt_bytes(result.new_bytes)} new, "
            f"{result.seconds:.1f}s"
        )
        if m.verified is False:
            self._report_unverified(m)
        else:
            self._said_unverified.clear()

    def _report_error(self, message: str, retry_in: float) -> None:
        if self._ended:
            return  # after the final flush: its own line said how it ended
        self.events.emit("snapshot_failed", error=message, retry_in=round(retry_in, 3))
        if retry_in > 0:
            console.warn(
                f"snapshot failed: {message}; retrying in {retry_in:.0f}s "
                "(one snapshot waits, the newest: later changes replace it)"
            )
        else:
            console.error(f"snapshot failed: {message}")

    def _report_recovered(self, down_for: float) -> None:
        self.events.emit("remote_recovered", down_seconds=round(down_for, 3))
        console.info(f"remote answers again after {down_for:.0f}s; caught up")

    def _status(self, worker: SnapshotWorker) -> dict[str, Any]:
        stats = worker.stats
        last = stats.last_durable
        return {
            "run": self.run_id,
            "attempt": self.attempt,
            "child_pid": self.child.pid if self.child and self.child.exit is None else None,
            "dir": str(self.cfg.dir),
            "remote": redact_url(self.cfg.remote),
            "last_snapshot": last.id if last else None,
            "last_snapshot_age": (time.time() - last.created) if last else None,
            "snapshots": stats.snapshots,
            "bytes_uploaded": stats.bytes_uploaded,
            "pending": worker.busy,
            **self._backlog(worker),
            "last_error": stats.last_error,
            "preemption": self._notice.describe() if self._notice is not None else None,
            **self._waiting_status(worker),
        }

    def _waiting_status(self, worker: SnapshotWorker) -> dict[str, Any]:
        """What a snapshot held back for a few seconds waits for."""
        waiting = worker.waiting
        if waiting is None:
            return {"waiting_for": None, "waiting_seconds": None}
        seconds, files = waiting
        return {
            "waiting_for": [{"path": p, "reason": r} for p, r in sorted(files.items())],
            "waiting_seconds": round(seconds, 1),
            "settle_timeout": self.cfg.settle_timeout,
        }

    def _backlog(self, worker: SnapshotWorker) -> dict[str, Any]:
        """What the snapshot under way still has to read and upload, and how
        fast it goes (else the last snapshot's rate)."""
        live = worker.snapshotter.live
        if live is None:
            return {"backlog_files": 0, "backlog_bytes": 0, "rate": self._rate}
        result, files, total, started = live
        elapsed = time.monotonic() - started
        return {
            "backlog_files": max(0, files - result.files_read),
            "backlog_bytes": max(0, total - result.bytes_read),
            "rate": result.bytes_read / elapsed if elapsed > 0.5 else self._rate,
        }

    def _title_loop(self, worker: SnapshotWorker, stop: threading.Event) -> None:
        """The live status, in the terminal's title (see console)."""
        while not stop.wait(1.0):
            st = self._status(worker)
            age = st["last_snapshot_age"]
            parts = [f"ckpt: attempt {self.attempt}"]
            parts.append(
                f"saved {console.fmt_age(age)} ago" if age is not None else "nothing saved yet"
            )
            if st["backlog_bytes"]:
                parts.append(
                    f"uploading {console.fmt_bytes(st['backlog_bytes'])} "
                    f"at {console.fmt_bytes(st['rate'])}/s"
                )
            if st["waiting_for"]:
                names = [f["path"] for f in st["waiting_for"]]
                shown = ", ".join(names[:2]) + (" ..." if len(names) > 2 else "")
                parts.append(f"waiting for {shown} ({console.fmt_age(st['waiting_seconds'])})")
            if st["last_error"]:
                parts.append("remote failing")
            if self._notice is not None:
                parts.append("PREEMPTED")
            console.title(" · ".join(parts))

    def _summary(self, worker: SnapshotWorker) -> None:
        stats = worker.stats
        last = stats.last_durable
        codes = ", ".join(a.exit.describe() for a in self.attempts) or "none"
        rolled = (
            f"; rolled back {', '.join(self._rollbacks)} (crash loop)" if self._rollbacks else ""
        )
        console.info(
            f"done: {console.plural(len(self.attempts), 'attempt')} ({codes}); "
            f"{console.plural(stats.snapshots, 'snapshot')}, "
            f"{console.fmt_bytes(stats.bytes_uploaded)} uploaded; newest durable snapshot: "
            f"{last.id if last else 'none'}{rolled}"
        )
        if console.is_terminal() and self.attempts:
            console.summary(
                "ckpt run",
                ["attempt", "exit", "duration"],
                [
                    [str(a.number), a.exit.describe(), console.fmt_age(a.seconds)]
                    for a in self.attempts
                ],
            )


def _files_in_progress(files: dict[str, str], limit: int = 3) -> str:
    """'model.pt (open for writing by pid 12 (python)), ...' for a line."""
    shown = [f"{p} ({files[p]})" for p in sorted(files)[:limit]]
    more = f" and {len(files) - limit} more" if len(files) > limit else ""
    return ", ".join(shown) + more


def _step_of(repo: Repository, ref: SnapshotRef) -> int | None:
    """The training step a snapshot was committed with (None: none, or unreadable)."""
    try:
        return repo.load_cached(ref).step
    except ManifestError:
        return None


def _record(signum: int, frame: object) -> None:
    """Signal handler: nothing to do; set_wakeup_fd already recorded signum."""
