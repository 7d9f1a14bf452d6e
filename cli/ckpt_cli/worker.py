"""The background snapshot worker: debounce change events, snapshot, upload,
retry with backoff when the remote fails, and answer explicit requests
(commit, final flush) once their snapshot is durable.

The snapshot rule (`--snapshots auto`, with checks): a snapshot is taken only
of a state in which no file is in progress (`progress`). While one is, the
previous snapshot stays the newest and the worker tries again when a waited
file is closed (a watchdog "closed" event), at the next change, and every
WAIT_POLL seconds, up to `settle` seconds; then it takes the snapshot anyway,
unverified. The final flush does not wait: the job is over, and what is in
progress then stays so. The growth of a file judged an appender is no
activity: it neither starts nor extends a quiet period (the appender's new
bytes ride along with the next snapshot, a rescan's at the latest); a
directory that stays busy is probed after PROBE_AFTER seconds to find its
appenders.

Runs on its own thread; the child is never blocked by it.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ckpt_cli.lease import LeaseLostError
from ckpt_cli.manifest import Manifest
from ckpt_cli.openfiles import OpenScan, is_log_name
from ckpt_cli.snapshotter import (
    Auto,
    NotWholeError,
    Pinned,
    SnapshotResult,
    Snapshotter,
    TornCommitError,
    UnreadableError,
)

#: A directory that never goes quiet is still snapshotted this often (seconds).
MAX_DELAY = 60.0
#: --settle-timeout's default: how long a snapshot waits for files in progress.
SETTLE = 120.0
#: While a snapshot waits, it is tried again at least this often (seconds): a
#: close event can be coalesced, or lost with a kernel queue overflow.
WAIT_POLL = 2.0
#: A wait is reported (console, `ckpt status`) once it lasted this long.
WAIT_SAY = 3.0
#: A directory busy this long without a quiet period is judged once without
#: a snapshot (a probe): the appenders it finds (one opened with O_APPEND
#: under a name that is no log's) stop counting as activity. At least twice
#: --debounce.
PROBE_AFTER = 5.0
#: Backoff after a failed snapshot: first delay and cap (seconds).
RETRY_FIRST = 1.0
RETRY_CAP = 30.0


#: The reason of the internal request that holds a commit the remote refused.
HELD = "commit (held)"


class Request:
    """An explicit snapshot request; wait() returns once it is durable or failed.
    A commit carries the directory pinned at the moment it was asked for."""

    def __init__(self, reason: str, pinned: Pinned | None = None) -> None:
        self.reason = reason
        self.pinned = pinned
        self._done = threading.Event()
        self.manifest: Manifest | None = None
        self.error: str | None = None
        self.retryable = True
        #: Requests answered by this one's outcome: older commits it superseded
        #: while the remote was down, flushes waiting for it.
        self.followers: list[Request] = []

    def finish(
        self, manifest: Manifest | None, error: str | None, *, retryable: bool = True
    ) -> None:
        """retryable=False: asking again cannot help (a torn or failed commit whose
        pinned content is gone, a lost lease)."""
        self.manifest, self.error, self.retryable = manifest, error, retryable
        self._done.set()
        for r in self.followers:
            r.finish(manifest, error, retryable=retryable)
        self.followers = []

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def superseded_by(self, new: Request) -> None:
        """This held commit was never uploaded; new is a later moment of the
        same directory. The flushes waiting on it get new's outcome, and its
        pin is released."""
        if self.pinned is not None:
            self.pinned.close()
        new.followers.extend(self.followers)
        self.followers = []

    @property
    def done(self) -> bool:
        return self._done.is_set()


@dataclasses.dataclass
class Stats:
    snapshots: int = 0
    bytes_uploaded: int = 0
    last_durable: Manifest | None = None
    last_durable_at: float | None = None  # time.time() it became durable
    last_error: str | None = None
    failing_since: float | None = None  # time.time() of the first failure in a row
    superseded: int = 0  # commits replaced by a newer one while the remote was down

    def failed(self, error: str) -> None:
        """A snapshot failed on the remote (the first of a row starts the outage)."""
        if self.failing_since is None:
            self.failing_since = time.time()
        self.last_error = error

    def recovered(self) -> float | None:
        """A snapshot succeeded: how long the remote was failing, if it was."""
        if self.failing_since is None:
            return None
        down_for = time.time() - self.failing_since
        self.failing_since = None
        return down_for

    def durable(self, manifest: Manifest, new_bytes: int) -> None:
        self.snapshots += 1
        self.bytes_uploaded += new_bytes
        self.last_durable = manifest
        self.last_durable_at = time.time()


@dataclasses.dataclass(frozen=True)
class Waiting:
    """A snapshot held back by files in progress."""

    since: float  # the worker's clock when the wait began
    files: dict[str, str]  # path -> why it is in progress
    said: bool = False  # reported (it lasted WAIT_SAY)


@dataclasses.dataclass(frozen=True)
class WaitNews:
    """What the console says about a wait: `kind` is "waiting" (it lasted
    WAIT_SAY, or what it waits for changed since it was said), "done" (a
    reported wait ended: the files are whole) or "settled" (the settle
    timeout ran out: the snapshot was taken anyway, unverified)."""

    kind: str
    files: dict[str, str]
    seconds: float


def wait_news(
    before: Waiting | None, files: dict[str, str], now: float, *, settled: bool = False
) -> tuple[Waiting | None, WaitNews | None]:
    """The wait after a try that found `files` in progress (empty: none), or
    that was taken anyway because the wait ran out (settled), and what to say
    about it, if anything: a pure decision."""
    if settled and before is not None:
        return None, WaitNews("settled", before.files, now - before.since)
    if not files or settled:
        if before is not None and before.said:
            return None, WaitNews("done", before.files, now - before.since)
        return None, None
    since = before.since if before is not None else now
    said = before.said if before is not None else False
    changed = before is None or set(before.files) != set(files)
    if now - since >= WAIT_SAY and (not said or changed):
        return Waiting(since, files, True), WaitNews("waiting", files, now - since)
    return Waiting(since, files, said), None


def after_judging(
    before: Waiting | None, result: SnapshotResult, now: float, settle: float, took_anyway: bool
) -> tuple[Waiting | None, WaitNews | None]:
    """wait_news after an automatic snapshot: taken anyway with files in
    progress once the settle time ran out is "settled", naming them."""
    ran_out = (
        took_anyway
        and bool(result.in_progress)
        and before is not None
        and now >= before.since + settle
    )
    waiting, news = wait_news(before, result.waiting, now, settled=ran_out)
    if news is not None and news.kind == "settled":
        news = dataclasses.replace(news, files=dict(result.in_progress))
    return waiting, news


def _failed_commit(error: str | None) -> str | None:
    return f"the last commit failed: {error}" if error else None


def unreadable_error(files: Mapping[str, str], snapshot: str = "the snapshot") -> str:
    """Why `snapshot` is not the directory's state although it was written:
    files ckpt could not read (path -> why) are in it at their version of an
    earlier snapshot, if any. A request waiting for the directory to be
    durable gets this as its error."""
    names = sorted(files)
    shown = ", ".join(f"{p} ({files[p]})" for p in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    its, it = ("their versions", "them") if len(names) > 1 else ("its version", "it")
    return (
        f"cannot read {shown}{more}, so {snapshot} holds {its} of an earlier snapshot, "
        f"if any; make {it} readable, or leave {it} out with --exclude"
    )


class Appenders:
    """Files whose growth is no activity: the appenders a snapshot judged ->
    the size it took; a file with a log's name is watched the same way."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sizes: dict[str, int] = {}

    def grew(self, rel: str) -> bool:
        """An appender (or a file with a log's name) that did not shrink since
        it was last seen; one stat."""
        last = self.sizes.get(rel)
        if last is None and not is_log_name(rel):
            return False
        try:
            size = os.stat(self.root / rel, follow_symlinks=False).st_size
        except OSError:
            return False
        if last is not None and size < last:
            return False
        self.sizes[rel] = size
        return True


def flush_answer(
    result: SnapshotResult | None, error: str | None, transient: bool
) -> tuple[Manifest | None, str | None, bool]:
    """What a plain request (a flush) is told after its snapshot: (the newest
    durable snapshot, the error, whether asking again may help). Files that
    could not be read make the snapshot not the directory's state."""
    newest = result.newest if result else None
    if error is None and result is not None and result.unreadable:
        what = f"snapshot {newest.id}" if newest else "the snapshot"
        return newest, unreadable_error(result.unreadable, what), False
    return newest, error, error is None or transient  # the remote's failure: ask again


def auto_job(
    now: float,
    *,
    retry_at: float,
    try_at: float | None,
    dirty: bool,
    quiet_at: float,
    probe_at: float | None,
    next_rescan: float,
) -> tuple[str | None, float]:
    """The automatic snapshot due now: "change" (a waited-for try is due, or
    the directory went quiet: debounce, or MAX_DELAY of changes), "probe" (a
    busy directory, judged for its appenders) or "rescan"; else None and how
    long until one may be (a backoff until retry_at holds them all). try_at:
    the next try of a held-back snapshot (None: none held back); probe_at:
    None if no probe is due in this busy spell."""
    waits = [next_rescan - now]
    if now < retry_at:
        return None, min(*waits, retry_at - now)
    if try_at is not None:
        if now >= try_at:
            return "change", 0.0
        waits.append(try_at - now)
    if dirty:
        if now >= quiet_at:
            return "change", 0.0
        waits.append(quiet_at - now)
        if probe_at is not None:
            if now >= probe_at:
                return "probe", 0.0
            waits.append(probe_at - now)
    if now >= next_rescan:
        return "rescan", 0.0
    return None, min(waits)


class SnapshotWorker:
    def __init__(
        self,
        snapshotter: Snapshotter,
        *,
        debounce: float,
        rescan: float,
        keep: int,
        attempt: Callable[[], int],
        on_snapshot: Callable[[SnapshotResult], None],
        on_error: Callable[[str, float], None],
        on_recovered: Callable[[float], None] = lambda _down_for: None,
        on_prune_error: Callable[[str], None] = lambda _message: None,
        commit_only: bool = False,
        clock: Callable[[], float] = time.monotonic,
        settle: float = SETTLE,
        open_scan: Callable[[], OpenScan] | None = None,
        on_wait: Callable[[WaitNews], None] = lambda _news: None,
    ) -> None:
        self.snapshotter = snapshotter
        #: --settle-timeout: how long a snapshot waits for files in progress.
        self.settle = settle
        #: The job's files open for writing (supervisor: a /proc scan of the job).
        self.open_scan = open_scan
        self.on_wait = on_wait
        self._waiting: Waiting | None = None
        self._try_at = 0.0  # the next try while waiting
        #: Appenders judged by the last snapshot: their growth is no activity.
        self._appending = Appenders(snapshotter.root)
        self._probed = False  # this busy spell was probed for appenders
        self.debounce, self.rescan, self.keep = debounce, rescan, keep
        self.attempt = attempt
        self.on_snapshot = on_snapshot
        self.on_error = on_error
        self.on_recovered = on_recovered
        self.on_prune_error = on_prune_error
        #: A snapshot was written and retention has not run since: it runs once
        #: the snapshot's waiters are answered (deleting a gigabyte of old
        #: chunks took 0.3 s of a commit's latency when it ran before).
        self._prune_due = False
        self.clock = clock
        self.stats = Stats(last_durable=snapshotter.parent)
        self._cond = threading.Condition()
        #: Changes not snapshotted yet: since when, and the last one.
        self._dirty, self._dirty_since, self._last_change = False, 0.0, 0.0
        self._requests: list[Request] = []
        self._stopping = False
        self._failures, self._retry_at = 0, 0.0  # failures in a row; backoff until
        self._lease_lost: str | None = None
        self._next_rescan = clock() + rescan
        #: --snapshots commit, or auto after the child's first commit: file
        #: events no longer make snapshots, so a restore never mixes two commits.
        self.commit_only = commit_only
        self._commit_error: str | None = None
        #: The newest commit whose upload failed on a remote error, with its pin
        #: still open: retried with backoff until the remote is back. At most
        #: one is held; a newer commit supersedes it (newest wins).
        self._held: Request | None = None
        self._transient = False
        self._thread = threading.Thread(target=self._run, name="ckpt-snapshot", daemon=True)

    # -- called from other threads

    def start(self) -> None:
        self._thread.start()

    def changed(self, event: str = "", paths: Sequence[str] = ()) -> None:
        """Something changed in the directory (event and relative paths, from
        the watcher; none: unknown, e.g. a replaced directory). An appender
        that grew is no activity; a waited-for file closed after writing is
        the cue to try again at once."""
        now = self.clock()
        if paths and event in ("modified", "closed") and all(map(self._appending.grew, paths)):
            return
        with self._cond:
            waiting = self._waiting
            if waiting is not None and event == "closed" and any(p in waiting.files for p in paths):
                self._try_at = now
            if not self._dirty:
                self._dirty_since = now
                self._probed = False
            self._dirty = True
            self._last_change = now
            self._cond.notify()

    @property
    def waiting(self) -> tuple[float, dict[str, str]] | None:
        """(seconds waited, files in progress and why) of a snapshot held back
        for WAIT_SAY or longer, else None (for `ckpt status`)."""
        with self._cond:
            w = self._waiting
            if w is None or self.commit_only:
                return None
            waited = self.clock() - w.since
            return (waited, dict(w.files)) if waited >= WAIT_SAY else None

    def request(self, reason: str) -> Request:
        """Snapshot soon (coalesced with other plain requests); in commit-only
        mode, only wait for the pending commits to be durable."""
        return self._enqueue(Request(reason))

    def commit(self, step: int | None = None) -> Request:
        """Pin the directory now (in the caller's thread) and queue its snapshot,
        tagged with the training `step` if given. The first commit switches the
        worker to commit-only mode. A file failing its format check raises
        NotWholeError (checked at the pin, so a commit that does not wait
        hears it too), and the mode stays as it was."""
        pinned = self.snapshotter.pin(check=True)
        pinned.step = step
        with self._cond:
            if not self.commit_only:
                self.commit_only = True
                self._dirty = False
        return self._enqueue(Request("commit", pinned))

    def _enqueue(self, req: Request) -> Request:
        with self._cond:
            if self._lease_lost:
                if req.pinned is not None:
                    req.pinned.close()
                req.finish(None, self._lease_lost)
                return req
            self._requests.append(req)
            self._retry_at = 0.0  # an explicit request does not wait out a backoff
            self._cond.notify()
        return req

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._dirty or bool(self._requests) or self._held is not None

    @property
    def holding(self) -> bool:
        """A commit is waiting for the remote to come back."""
        return self._held_request() is not None

    # -- the worker thread

    def _next(self) -> tuple[str, list[Request]] | None:
        with self._cond:
            while True:
                now = self.clock()
                if self._requests:
                    batch, self._requests = self._requests, []
                    self._dirty = False
                    return batch[-1].reason, batch
                if self._stopping:
                    return None
                if self._held is not None and now >= self._retry_at:
                    return "commit", []
                if self.commit_only:  # file events and rescans make no snapshot now
                    self._dirty = False
                    self._waiting = None
                    self._cond.wait(None if self._held is None else max(0.01, self._retry_at - now))
                    continue
                probe = not self._probed and self.open_scan is not None
                job, wait = auto_job(
                    now,
                    retry_at=self._retry_at,
                    try_at=self._try_at if self._waiting is not None else None,
                    dirty=self._dirty,
                    quiet_at=min(self._last_change + self.debounce, self._dirty_since + MAX_DELAY),
                    probe_at=self._dirty_since + max(PROBE_AFTER, 2 * self.debounce)
                    if probe
                    else None,
                    next_rescan=self._next_rescan,
                )
                if job == "change":
                    self._dirty = False
                elif job == "probe":
                    self._probed = True
                if job is not None:
                    return job, []
                self._cond.wait(max(0.01, wait))

    def _run(self) -> None:
        while True:
            # Also after the final flush: the supervisor joins this thread
            # before it releases the lease, so --keep holds when a run ends.
            if self._prune_due and not self._lease_lost:
                self._prune()
            job = self._next()
            if job is None:
                return
            reason, batch = job
            with self._cond:
                self._next_rescan = self.clock() + self.rescan
                held, self._held = self._held, None
            if not batch:
                if held is not None:
                    self._commit(held)
                elif reason == "probe":
                    self._probe()
                else:
                    self._take(reason, None)
                continue
            # Commits are taken one by one, each from its own pinned moment;
            # plain requests share one snapshot (none in commit-only mode).
            plain = [r for r in batch if r.pinned is None]
            commits = [r for r in batch if r.pinned is not None]
            if held is not None:
                if commits:  # a newer commit replaces the held one: newest wins
                    self._supersede(held, commits[0])
                else:
                    commits = [held]
            for i, r in enumerate(commits):
                if self._commit(r) and i + 1 < len(commits):
                    self._supersede(self._release_held(), commits[i + 1])
            waiting = self._held_request()
            if plain and waiting is not None:
                # A flush waits for the held commit: it is what would be lost.
                waiting.followers.extend(plain)
                plain = []
            if plain:
                if self.commit_only:
                    # Only commits make snapshots now: what is durable is the last
                    # commit, unless it failed (its pinned content is gone).
                    error = self._lease_lost or _failed_commit(self._commit_error)
                    for r in plain:
                        r.finish(self.stats.last_durable, error, retryable=False)
                    continue
                # The final flush does not wait: the job is over, and what is
                # in progress now stays so.
                final = any(r.reason == "final" for r in plain)
                result, error = self._take(plain[-1].reason, None, take_anyway=final)
                newest, why, retry = flush_answer(result, error, self._transient)
                for r in plain:
                    r.finish(newest, why, retryable=retry)
            if self._lease_lost:
                self._fail_pending(self._lease_lost)
                self._wait_for_stop()
                return

    def _commit(self, r: Request) -> bool:
        """Snapshot one commit; its waiter is answered at once either way.
        Returns True when the remote failed: the pinned moment is then held
        (by an internal request that flushes can wait on) and retried with
        backoff, so the child is told "not durable yet" without waiting for
        the remote to come back, and the state is not lost."""
        pinned = r.pinned
        assert pinned is not None
        result, error = self._take("commit", pinned)
        if error is not None and self._transient:
            if r.reason == HELD:  # a retry that failed again: keep holding it
                with self._cond:
                    self._held = r
                return True
            holder = Request(HELD, pinned)
            r.pinned = None
            # Flushes that waited on an earlier held commit now wait on this one.
            holder.followers, r.followers = r.followers, []
            with self._cond:
                self._held = holder  # before r is answered: its waiter sees `holding`
            r.finish(
                None,
                f"{error}; the commit is kept and uploaded when the remote answers "
                "(a newer commit replaces it)",
            )
            return True
        pinned.close()
        self._commit_error = error
        # Not the remote's fault (a torn or unreadable file, a lost lease):
        # asking again for the same moment cannot help.
        r.finish(result.newest if result else None, error, retryable=error is None)
        return False

    def _held_request(self) -> Request | None:
        with self._cond:
            return self._held

    def _release_held(self) -> Request:
        with self._cond:
            held, self._held = self._held, None
        assert held is not None
        return held

    def _supersede(self, held: Request, new: Request) -> None:
        held.superseded_by(new)
        self.stats.superseded += 1

    def _take(
        self, reason: str, pinned: Pinned | None, *, take_anyway: bool = False
    ) -> tuple[SnapshotResult | None, str | None]:
        """One snapshot; failures are reported, backed off and returned.
        self._transient tells whether trying the same again later may work.
        An automatic one (not pinned) may be held back by files in progress
        (result.waiting): then the wait goes on, and the previous snapshot
        stays the newest."""
        self._transient = False
        if self._lease_lost:
            return None, self._lease_lost
        auto = None
        if pinned is None:
            now = self.clock()
            waiting = self._waiting
            settled = waiting is not None and now >= waiting.since + self.settle
            auto = Auto(self.open_scan, take_anyway or settled or self.settle <= 0)
        try:
            result = self.snapshotter.snapshot(
                reason=reason, attempt=self.attempt(), pinned=pinned, auto=auto
            )
        except (LeaseLostError, TornCommitError, UnreadableError, NotWholeError) as exc:
            # Not the remote's: trying the same again cannot help.
            if isinstance(exc, LeaseLostError):
                self._lease_lost = str(exc)
            self.stats.last_error = str(exc)
            self.on_error(str(exc), 0.0)
            return None, str(exc)
        except Exception as exc:
            message = str(exc) or type(exc).__name__
            self._transient = True
            self._failures += 1
            self.stats.failed(message)
            delay = min(RETRY_CAP, RETRY_FIRST * 2 ** (self._failures - 1))
            with self._cond:
                self._retry_at = self.clock() + delay
                if not self.commit_only:
                    self._dirty = True
                    self._dirty_since = self._last_change = self.clock()
            self.on_error(message, delay)
            return None, message
        self._failures = 0
        self.stats.last_error = None
        if auto is not None:
            self._judged(result, auto.take_anyway)
        down_for = self.stats.recovered()
        if down_for is not None:
            self.on_recovered(down_for)
        if result.manifest is not None:
            self._prune_due = True
            self.stats.durable(result.manifest, result.new_bytes)
        if result.unstable:
            self.changed()  # something was mid-write: look again once it is quiet
        self.on_snapshot(result)
        return result, None

    def _probe(self) -> None:
        """Judge the busy directory without taking a snapshot, to learn its
        appenders. Best effort: a failure changes nothing."""
        try:
            result = self.snapshotter.snapshot(
                reason="probe", attempt=self.attempt(), auto=Auto(self.open_scan, probe=True)
            )
        except Exception:
            return
        self._appending.sizes.update(result.appenders)

    def _judged(self, result: SnapshotResult, took_anyway: bool) -> None:
        """After an automatic snapshot: the appenders it found, and the wait."""
        self._appending.sizes = dict(result.appenders)
        now = self.clock()
        with self._cond:
            before = self._waiting
        waiting, news = after_judging(before, result, now, self.settle, took_anyway)
        with self._cond:
            self._waiting = waiting
            if waiting is not None:
                self._try_at = min(now + WAIT_POLL, max(now, waiting.since + self.settle))
        if news is not None:
            self.on_wait(news)

    def _prune(self) -> None:
        """Retention on this thread, between snapshots: it never races this
        writer's uploads. A failure leaves old snapshots for the next prune."""
        self._prune_due = False
        try:
            self.snapshotter.prune(self.keep)
        except LeaseLostError as exc:
            self._lease_lost = str(exc)
            self.stats.last_error = str(exc)
            self.on_error(str(exc), 0.0)
        except Exception as exc:
            self.on_prune_error(str(exc) or type(exc).__name__)

    def _fail_pending(self, error: str) -> None:
        with self._cond:
            pending, self._requests = self._requests, []
            if self._held is not None:
                pending.append(self._held)
                self._held = None
        for r in pending:
            if r.pinned is not None:
                r.pinned.close()
            r.finish(None, error, retryable=False)

    def _wait_for_stop(self) -> None:
        with self._cond:
            while not self._stopping:
                self._cond.wait()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
