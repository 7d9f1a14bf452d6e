"""The background snapshot worker: debounce change events, snapshot, upload,
retry with backoff when the remote fails, and answer explicit requests
(commit, final flush) once their snapshot is durable.

Runs on its own thread; the child is never blocked by it. Imports: standard
library, `snapshotter`, `repository`, `errors`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from ckpt_cli.lease import LeaseLostError
from ckpt_cli.manifest import Manifest
from ckpt_cli.snapshotter import Pinned, SnapshotResult, Snapshotter, TornCommitError

#: A directory that never goes quiet is still snapshotted this often (seconds).
MAX_DELAY = 60.0
#: Backoff after a failed snapshot: first delay and cap (seconds).
RETRY_FIRST = 1.0
RETRY_CAP = 30.0


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

    def finish(
        self, manifest: Manifest | None, error: str | None, *, retryable: bool = True
    ) -> None:
        """retryable=False: asking again cannot help (a torn or failed commit whose
        pinned content is gone, a lost lease)."""
        self.manifest, self.error, self.retryable = manifest, error, retryable
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

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
        commit_only: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.snapshotter = snapshotter
        self.debounce = debounce
        self.rescan = rescan
        self.keep = keep
        self.attempt = attempt
        self.on_snapshot = on_snapshot
        self.on_error = on_error
        self.clock = clock
        self.stats = Stats(last_durable=snapshotter.parent)
        self._cond = threading.Condition()
        self._dirty = False
        self._dirty_since = 0.0
        self._last_change = 0.0
        self._requests: list[Request] = []
        self._stopping = False
        self._failures = 0
        self._retry_at = 0.0
        self._lease_lost: str | None = None
        self._next_rescan = clock() + rescan
        #: --snapshots commit, or auto after the child's first commit: file
        #: events no longer make snapshots, so a restore never mixes two commits.
        self.commit_only = commit_only
        self._commit_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="ckpt-snapshot", daemon=True)

    # -- called from other threads

    def start(self) -> None:
        self._thread.start()

    def changed(self) -> None:
        now = self.clock()
        with self._cond:
            if not self._dirty:
                self._dirty_since = now
            self._dirty = True
            self._last_change = now
            self._cond.notify()

    def request(self, reason: str) -> Request:
        """Snapshot soon (coalesced with other plain requests); in commit-only
        mode, only wait for the pending commits to be durable."""
        return self._enqueue(Request(reason))

    def commit(self) -> Request:
        """Pin the directory now (in the caller's thread) and queue its snapshot.
        The first commit switches the worker to commit-only mode."""
        pinned = self.snapshotter.pin()
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
            return self._dirty or bool(self._requests)

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
                if self.commit_only:  # file events and rescans make no snapshot now
                    self._dirty = False
                    self._cond.wait()
                    continue
                waits = [self._next_rescan - now]
                if now >= self._retry_at:
                    if self._dirty:
                        quiet_at = min(
                            self._last_change + self.debounce, self._dirty_since + MAX_DELAY
                        )
                        if now >= quiet_at:
                            self._dirty = False
                            return "change", []
                        waits.append(quiet_at - now)
                    if now >= self._next_rescan:
                        return "rescan", []
                else:
                    waits.append(self._retry_at - now)
                self._cond.wait(max(0.01, min(waits)))

    def _run(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            reason, batch = job
            with self._cond:
                self._next_rescan = self.clock() + self.rescan
            if not batch:
                self._take(reason, None)
                continue
            # Commits are taken one by one, each from its own pinned moment;
            # plain requests share one snapshot (none in commit-only mode).
            plain = [r for r in batch if r.pinned is None]
            for r in batch:
                if r.pinned is not None:
                    result, error = self._take("commit", r.pinned)
                    self._commit_error = error
                    r.finish(result.newest if result else None, error)
            if plain:
                if self.commit_only:
                    # Only commits make snapshots now: what is durable is the last
                    # commit, unless it failed (its pinned content is gone).
                    error = self._lease_lost or (
                        f"the last commit failed: {self._commit_error}"
                        if self._commit_error
                        else None
                    )
                    for r in plain:
                        r.finish(self.stats.last_durable, error, retryable=False)
                    continue
                result, error = self._take(plain[-1].reason, None)
                for r in plain:
                    r.finish(result.newest if result else None, error)
            if self._lease_lost:
                self._fail_pending(self._lease_lost)
                self._wait_for_stop()
                return

    def _take(self, reason: str, pinned: Pinned | None) -> tuple[SnapshotResult | None, str | None]:
        """One snapshot; failures are reported, backed off and returned."""
        if self._lease_lost:
            if pinned is not None:
                pinned.close()
            return None, self._lease_lost
        try:
            result = self.snapshotter.snapshot(
                reason=reason, attempt=self.attempt(), keep=self.keep, pinned=pinned
            )
        except LeaseLostError as exc:
            self._lease_lost = str(exc)
            self.stats.last_error = str(exc)
            self.on_error(str(exc), 0.0)
            return None, str(exc)
        except TornCommitError as exc:
            self.stats.last_error = str(exc)
            self.on_error(str(exc), 0.0)
            return None, str(exc)
        except Exception as exc:
            message = str(exc) or type(exc).__name__
            self._failures += 1
            delay = min(RETRY_CAP, RETRY_FIRST * 2 ** (self._failures - 1))
            with self._cond:
                self._retry_at = self.clock() + delay
                if not self.commit_only:
                    self._dirty = True
                    self._dirty_since = self._last_change = self.clock()
            self.stats.last_error = message
            self.on_error(message, delay)
            return None, message
        self._failures = 0
        self.stats.last_error = None
        if result.manifest is not None:
            self.stats.snapshots += 1
            self.stats.bytes_uploaded += result.new_bytes
            self.stats.last_durable = result.manifest
            self.stats.last_durable_at = time.time()
        if result.unstable:
            self.changed()  # something was mid-write: look again once it is quiet
        self.on_snapshot(result)
        return result, None

    def _fail_pending(self, error: str) -> None:
        with self._cond:
            pending, self._requests = self._requests, []
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
