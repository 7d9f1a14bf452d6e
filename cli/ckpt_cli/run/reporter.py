"""What a run says: ckpt's console lines, the JSON event log, the run
history's records, the live status (`ckpt status`) and the terminal's title.
The loop and the snapshot thread tell it what happened; it decides nothing."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from ckpt_cli import __version__, console
from ckpt_cli.errors import CkptError
from ckpt_cli.events import EventLog
from ckpt_cli.history import RunHistory, changed_at
from ckpt_cli.manifest import Manifest
from ckpt_cli.policy import ChildExit, Decision, signal_name
from ckpt_cli.repair import Repaired
from ckpt_cli.run import preemption
from ckpt_cli.snapshotter import SnapshotResult
from ckpt_cli.worker import SnapshotWorker, WaitNews, unreadable_error

#: The `end` event's cost fields when the run ended before its history began.
NO_COSTS = {"failures": None, "lost_seconds": None, "resume_seconds": None}


@dataclasses.dataclass
class Attempt:
    number: int
    exit: ChildExit
    seconds: float


class Reporter:
    def __init__(self, events: EventLog, *, run_id: str, settle_timeout: float) -> None:
        self.events = events
        self.run_id = run_id
        self.settle_timeout = settle_timeout
        self.history: RunHistory | None = None  # recorded from the first attempt on
        self.worker: SnapshotWorker | None = None
        self.rate = 0.0  # bytes/s of the last snapshot that uploaded anything
        self.ended = False  # the final flush and the worker are done: no more reports
        self._warned_links: set[str] = set()
        self._unreadable: dict[str, str] = {}  # files said to be unreadable
        self._said_unverified: set[str] = set()  # files in progress said, once each

    # ------------------------------------------------------------ the run

    def start(self, shown: str, *, default_remote: bool, dir: str, command: list[str]) -> None:
        if default_remote:
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
            dir=dir,
            command=command,
            host=os.uname().nodename,
            pid=os.getpid(),
            version=__version__,
        )

    def watching(self, poller: preemption.Poller | None, mode: str) -> None:
        if poller is not None:
            cloud = poller.cloud
            how = (
                f"this machine's DMI data says {cloud}"
                if mode == "auto"
                else f"--preemption {cloud}"
            )
            console.info(
                f"preemption: watching {poller.describe()} ({how}; --preemption off to stop)"
            )
        elif mode == "auto":
            console.debug("preemption: DMI data names no cloud here; nothing is polled")

    def starts_from(self, restored: str, generation: int | None) -> None:
        """The snapshot the run restored ("" for none: it starts fresh)."""
        if restored:
            self.events.emit("restore", snapshot=restored, generation=generation)
        else:
            self.events.emit("fresh", reason="nothing restored")

    def end(
        self, status: int, outcome: str, attempts: int, worker: SnapshotWorker | None = None
    ) -> None:
        """The `end` event, whatever the way out (without the worker's figures
        when the run ended before its end was reached)."""
        last = worker.stats.last_durable if worker is not None else None
        self.events.emit(
            "end",
            status=status,
            outcome=outcome,
            attempts=attempts,
            snapshots=worker.stats.snapshots if worker is not None else None,
            bytes_uploaded=worker.stats.bytes_uploaded if worker is not None else None,
            last_snapshot=last.id if last else None,
            **(self.history.costs() if self.history is not None else NO_COSTS),
        )

    def close_history(self, display: str, wait: float) -> None:
        """Wait up to `wait` for the run history's writer (its end written)."""
        history = self.history
        assert history is not None
        if not history.close(timeout=wait) and not history.failure_reported:
            # Said once: not again when the writer already said it cannot write.
            console.warn(
                f"the run history in {display} misses this run's end: {history.failure}"
                if history.failure
                else f"the run history in {display} misses this run's end"
            )

    # ------------------------------------------------------------ attempts

    def attempt_starting(self, attempt: int, restored: str) -> None:
        if self.history is not None:
            self.history.attempt_started(attempt, resumed=restored)

    def launched(self, attempt: int, command: str, pid: int) -> None:
        console.info(f"attempt {attempt}: started {command} (pid {pid})")
        self.events.emit("launch", attempt=attempt, pid=pid)

    def attempt_ended(self, a: Attempt, ended: float, outcome: str) -> None:
        ex = a.exit
        if self.history is not None:
            self.history.attempt_ended(
                a.number, ex.status, ex.describe(), a.seconds, ended=ended, outcome=outcome
            )
        self.events.emit(
            "exit",
            attempt=a.number,
            status=ex.status,
            description=ex.describe(),
            seconds=round(a.seconds, 3),
        )
        console.info(f"attempt {a.number}: {ex.describe()} after {a.seconds:.1f}s")

    def give_up(self, ex: ChildExit, decision: Decision, retries: int) -> None:
        if decision is Decision.FATAL:
            self.events.emit("give_up", status=ex.status, reason="not retried (--retry-on)")
            console.error(
                f"child failed with {ex.describe()}, which is not retried "
                "(--retry-on); passing it on"
            )
            return
        self.events.emit("give_up", status=ex.status, reason="retries spent (--retries)")
        spent = (
            "no retry allowed"
            if not retries
            else ("its one retry spent" if retries == 1 else f"all {retries} retries spent")
        )
        console.error(f"giving up: {ex.describe()} and {spent} (--retries)")

    def retry(self, ex: ChildExit, attempt: int, retry: int, retries: int, delay: float) -> None:
        self.events.emit(
            "retry", attempt=attempt, retry=retry, retries=retries, delay=round(delay, 3)
        )
        console.info(f"recoverable ({ex.describe()}): retry {retry}/{retries} in {delay:.1f}s")

    def stop(self, sig: int) -> None:
        """The first stop signal (the notice's own stop counts as SIGTERM)."""
        self.events.emit("stop", signal=signal_name(sig))

    # ------------------------------------------------------------ signals

    def child_env(self, env: dict[str, str]) -> None:
        console.debug(
            "child env: "
            + " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("CKPT_"))
        )

    def leftovers(self, left: int) -> None:
        if left:
            console.info(
                f"stopped {console.plural(left, 'process', 'processes')} the child left behind"
            )

    def forwarded(self, sig: int, grace: float) -> None:
        console.info(
            f"received {signal_name(sig)}: forwarded to the child; "
            f"SIGKILL in {grace:g}s unless it exits (--grace)"
        )

    def killing_now(self, sig: int) -> None:
        console.warn(f"received {signal_name(sig)} again: killing the child now")

    def grace_over(self, stop_signal: int | None) -> None:
        console.warn(
            f"child still running after {signal_name(stop_signal or 0)} and its "
            "grace period (--grace): SIGKILL"
        )

    def after_notice_stop(self, sig: int, doing: str) -> None:
        """The OS's stop after ckpt stopped the child for a notice."""
        console.info(f"received {signal_name(sig)} after the preemption notice: {doing}")

    def not_passed_on(self, sig: int, exc: CkptError) -> None:
        console.warn(f"received {signal_name(sig)}, not passed on: {exc}")

    def stopped_backing_off(self, sig: int) -> None:
        console.info(f"received {signal_name(sig)} while backing off: stopping")

    def no_checkpoint(self, exc: CkptError) -> None:
        """A notice came and the child has no handler to checkpoint with."""
        console.info(f"{exc}; snapshotting what is on disk")

    def stop_planned(self, stop_in: float) -> None:
        console.info(
            f"preemption: the child is stopped in {stop_in:.0f}s; no relaunch on this machine"
        )

    def notice_stop(self, grace: float) -> None:
        console.warn(
            f"preemption: stopping the child now (SIGTERM; SIGKILL in {grace:.0f}s) "
            "so that its final state is durable before the machine goes away"
        )

    # ------------------------------------------------------------ the final flush

    def flush_stop(self, sig: int) -> None:
        console.info(
            f"received {signal_name(sig)}: finishing the final snapshot "
            "first (a second signal abandons it)"
        )

    def flush_abandoned(self, sig: int) -> None:
        console.warn(
            f"received {signal_name(sig)} again: the final flush is abandoned "
            "(no retry); an upload under way is let finish (at most "
            "--flush-timeout), then ckpt exits"
        )

    def durable(self, snapshot: str, under_way: bool = False) -> None:
        more = " (its upload was under way)" if under_way else ""
        console.info(f"final state is durable as snapshot {snapshot}{more}")

    def not_durable(self, why: str) -> None:
        assert self.worker is not None
        last = self.worker.stats.last_durable
        newest = f"newest durable snapshot is {last.id}" if last else "nothing is durable yet"
        console.error(f"final snapshot {why}; {newest}")

    def outcome(self, warning: str, error: str) -> None:
        """The line that says how the run ended (flush.outcome's)."""
        if warning:
            console.warn(warning)
        if error:
            console.error(error)

    def notice(self, notice: preemption.Notice, context: str) -> None:
        console.warn(f"preemption notice{context}: {notice.describe()}")
        record = dataclasses.asdict(notice)  # cloud, action, deadline, detail
        self.events.emit("preemption", **record)
        if self.history is not None:
            self.history.preempted(record)

    def hibernation(self, notice: preemption.Notice) -> None:
        console.warn(
            f"preemption notice: {notice.describe()}: the job is frozen with the instance "
            "and goes on when it resumes; checkpointing now in case it does not"
        )

    def rolled_back(self, record: dict[str, Any]) -> None:
        """The crash-loop guard rolled back (recovery.Recovery)."""
        self.events.emit("rollback", **record)
        if self.history is not None:
            self.history.rolled_back(
                {"from": record["snapshot"], "to": record["to"], "attempts": record["attempts"]}
            )

    def repaired(self, done: Repaired) -> None:
        self.events.emit("repair", **done.event())

    def summary(self, attempts: list[Attempt], rollbacks: list[str]) -> None:
        assert self.worker is not None
        stats = self.worker.stats
        last = stats.last_durable
        codes = ", ".join(a.exit.describe() for a in attempts) or "none"
        rolled = f"; rolled back {', '.join(rollbacks)} (crash loop)" if rollbacks else ""
        console.info(
            f"done: {console.plural(len(attempts), 'attempt')} ({codes}); "
            f"{console.plural(stats.snapshots, 'snapshot')}, "
            f"{console.fmt_bytes(stats.bytes_uploaded)} uploaded; newest durable snapshot: "
            f"{last.id if last else 'none'}{rolled}"
        )
        if console.is_terminal() and attempts:
            console.summary(
                "ckpt run",
                ["attempt", "exit", "duration"],
                [[str(a.number), a.exit.describe(), console.fmt_age(a.seconds)] for a in attempts],
            )

    # ------------------------------------------------------------ snapshots

    def wait_news(self, news: WaitNews) -> None:
        """A snapshot waits for files in progress (said once it waited a few
        seconds, and again when what it waits for changes), no longer waits,
        or gave up waiting (the snapshot's own report names the files)."""
        if self.ended:
            return
        files = [{"path": p, "reason": r} for p, r in sorted(news.files.items())]
        self.events.emit(
            "snapshot_waiting", state=news.kind, files=files, seconds=round(news.seconds, 3)
        )
        if news.kind == "waiting":
            last = self.worker.stats.last_durable if self.worker is not None else None
            stays = f"snapshot {last.id} stays the newest" if last else "no snapshot yet"
            console.info(
                f"snapshot waits for {files_in_progress(news.files)}: {stays} "
                f"(at most {self.settle_timeout:g}s, --settle-timeout)"
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
                f"unverified: {files_in_progress(news.files, 5)} (a restore prefers the "
                "newest verified snapshot)"
            )

    def _unverified(self, m: Manifest) -> None:
        """A snapshot written with files in progress (the final one, or one
        naming a torn file left as it is, which keeps every later snapshot
        unverified until it is rewritten or removed): each file and why, once
        per file."""
        fresh = {p: r for p, r in m.unverified if p not in self._said_unverified}
        self._said_unverified = {p for p, _ in m.unverified}
        if fresh:
            console.warn(
                f"snapshot {m.id} is unverified: {files_in_progress(fresh, 5)} "
                "(a restore prefers the newest verified snapshot)"
            )

    def _skipped(self, result: SnapshotResult) -> None:
        """What a snapshot left out: links out of --dir, files that changed
        while read, unreadable files (each said once while it stays so)."""
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

    def snapshot(self, result: SnapshotResult) -> None:
        self._skipped(result)
        m = result.manifest
        if m is None:
            parent = result.parent
            if result.waiting:
                console.debug(
                    f"snapshot held back: {files_in_progress(result.waiting)} in progress"
                )
                return
            console.debug(
                f"nothing changed since snapshot {parent.id if parent else '(none)'}: no snapshot"
            )
            return
        if result.new_bytes and result.seconds > 0:
            self.rate = result.new_bytes / result.seconds
        if self.history is not None:  # its state is the moment ckpt began reading it
            changed = changed_at(m.entries, result.parent.entries if result.parent else None)
            self.history.snapshot_taken(m.id, m.attempt, time.time() - result.seconds, changed)
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
            self._unverified(m)
        else:
            self._said_unverified.clear()

    def snapshot_failed(self, message: str, retry_in: float) -> None:
        if self.ended:
            return  # after the final flush: its own line said how it ended
        self.events.emit("snapshot_failed", error=message, retry_in=round(retry_in, 3))
        if retry_in > 0:
            console.warn(
                f"snapshot failed: {message}; retrying in {retry_in:.0f}s "
                "(one snapshot waits, the newest: later changes replace it)"
            )
        else:
            console.error(f"snapshot failed: {message}")

    def recovered(self, down_for: float) -> None:
        self.events.emit("remote_recovered", down_seconds=round(down_for, 3))
        console.info(f"remote answers again after {down_for:.0f}s; caught up")


def files_in_progress(files: dict[str, str], limit: int = 3) -> str:
    """'model.pt (open for writing by pid 12 (python)), ...' for a line."""
    shown = [f"{p} ({files[p]})" for p in sorted(files)[:limit]]
    more = f" and {len(files) - limit} more" if len(files) > limit else ""
    return ", ".join(shown) + more
