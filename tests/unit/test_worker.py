"""SnapshotWorker with a real Snapshotter on a local file backend."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt_cli.backends import open_backend
from ckpt_cli.backends.local import LocalBackend
from ckpt_cli.errors import RemoteError
from ckpt_cli.lease import LeaseLostError
from ckpt_cli.repository import Repository
from ckpt_cli.snapshotter import SnapshotResult, Snapshotter, UnreadableError
from ckpt_cli.worker import SnapshotWorker

from .helpers import CHUNK, OLD_NS, DelegatingBackend, data, write

#: Generous deadline for a background snapshot of a few KiB (never a timing assert).
DEADLINE = 30.0


class FlakyBackend(DelegatingBackend):
    """A LocalBackend whose first `failures` writes raise RemoteError."""

    def __init__(self, inner: LocalBackend, failures: int) -> None:
        super().__init__(inner)
        self.failures = failures
        self.failed = 0
        self._lock = threading.Lock()

    def write(self, key: str, data: bytes) -> None:
        with self._lock:
            if self.failed < self.failures:
                self.failed += 1
                raise RemoteError(f"injected failure #{self.failed} writing {key}")
        self.inner.write(key, data)


class Harness:
    def __init__(self, repo: Repository, root: Path, **snap_kwargs: object) -> None:
        self.repo = repo
        self.root = root
        self.snapshotter = Snapshotter(repo, root, **snap_kwargs)  # type: ignore[arg-type]
        self.results: list[SnapshotResult] = []
        self.errors: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        self.worker = SnapshotWorker(
            self.snapshotter,
            debounce=0.05,
            rescan=3600.0,
            keep=3,
            attempt=lambda: 1,
            on_snapshot=self._on_snapshot,
            on_error=self._on_error,
        )

    def _on_snapshot(self, result: SnapshotResult) -> None:
        with self._lock:
            self.results.append(result)

    def _on_error(self, message: str, delay: float) -> None:
        with self._lock:
            self.errors.append((message, delay))

    def wait_for(self, condition: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            with self._lock:
                if condition():
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self.worker.stop()
        self.worker.join(DEADLINE)
        self.snapshotter.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def harness_factory() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(repo: Repository, root: Path, **kw: object) -> Harness:
        h = Harness(repo, root, **kw)
        made.append(h)
        h.worker.start()
        return h

    yield make
    for h in made:
        h.close()


def test_commit_request_returns_durable_manifest(
    local_repo: Repository, root: Path, harness_factory: Callable[..., Harness]
) -> None:
    write(root / "model.pt", data(1, 2 * CHUNK + 5))
    h = harness_factory(local_repo, root)

    req = h.worker.request("commit")
    assert req.wait(DEADLINE)

    assert req.error is None
    m = req.manifest
    assert m is not None
    assert m.reason == "commit"
    assert m.attempt == 1
    # durable: listed in the repository, loads back, and every chunk verifies
    [ref] = local_repo.snapshots()
    assert ref.id == m.id
    loaded = local_repo.load(ref)
    assert loaded == m
    e = loaded.entries[0]
    got = b"".join(local_repo.get_chunk(d) for d in e.chunks)
    assert got == data(1, 2 * CHUNK + 5)
    assert h.worker.stats.last_durable == m
    assert h.worker.stats.snapshots == 1


def test_commit_with_nothing_new_returns_current(
    local_repo: Repository, root: Path, harness_factory: Callable[..., Harness]
) -> None:
    write(root / "f", b"x")
    h = harness_factory(local_repo, root)
    first = h.worker.request("commit")
    assert first.wait(DEADLINE)
    assert first.manifest is not None
    second = h.worker.request("commit")
    assert second.wait(DEADLINE)
    assert second.error is None
    assert second.manifest == first.manifest  # nothing changed: the same durable snapshot
    assert len(local_repo.snapshots()) == 1


def test_changed_then_quiet_triggers_snapshot(
    local_repo: Repository, root: Path, harness_factory: Callable[..., Harness]
) -> None:
    h = harness_factory(local_repo, root)
    write(root / "step-1.pt", data(7, CHUNK))
    h.worker.changed()

    assert h.wait_for(lambda: any(r.manifest is not None for r in h.results))

    [ref] = local_repo.snapshots()
    m = local_repo.load(ref)
    assert m.reason == "change"
    assert [e.path for e in m.entries] == ["step-1.pt"]
    assert h.errors == []


def test_repeated_changes_are_debounced_into_later_snapshots(
    local_repo: Repository, root: Path, harness_factory: Callable[..., Harness]
) -> None:
    h = harness_factory(local_repo, root)
    write(root / "a", b"a")
    h.worker.changed()
    assert h.wait_for(lambda: len(h.results) >= 1)
    write(root / "b", b"b")
    h.worker.changed()
    assert h.wait_for(
        lambda: any(
            r.manifest is not None and {e.path for e in r.manifest.entries} == {"a", "b"}
            for r in h.results
        )
    )
    assert h.wait_for(lambda: not h.worker.busy)


def test_failing_remote_fails_request_then_recovers(
    tmp_path: Path, root: Path, harness_factory: Callable[..., Harness]
) -> None:
    inner = open_backend(str(tmp_path / "remote"))
    assert isinstance(inner, LocalBackend)
    flaky = FlakyBackend(inner, failures=1)
    repo = Repository(flaky, CHUNK)
    write(root / "model.pt", data(3, CHUNK))
    h = harness_factory(repo, root, concurrency=1)

    first = h.worker.request("commit")
    assert first.wait(DEADLINE)
    assert first.manifest is None
    assert first.error is not None
    assert "injected failure" in first.error
    assert repo.snapshots() == []
    assert h.wait_for(lambda: len(h.errors) == 1)
    message, delay = h.errors[0]
    assert "injected failure" in message
    assert delay > 0
    assert h.worker.stats.last_error is not None

    second = h.worker.request("commit")  # does not wait out the backoff
    assert second.wait(DEADLINE)
    assert second.error is None
    assert second.manifest is not None
    assert [r.id for r in repo.snapshots()] == [second.manifest.id]
    assert repo.get_chunk(second.manifest.entries[0].chunks[0]) == data(3, CHUNK)
    error_now: str | None = h.worker.stats.last_error
    assert error_now is None
    assert flaky.failed == 1


def test_failing_manifest_write_then_recovers(
    tmp_path: Path, root: Path, harness_factory: Callable[..., Harness]
) -> None:
    """Chunks already uploaded, manifest write failed: nothing is committed; the
    next request commits without uploading the chunks again."""
    inner = open_backend(str(tmp_path / "remote"))
    assert isinstance(inner, LocalBackend)

    class ManifestFails(FlakyBackend):
        def write(self, key: str, data: bytes) -> None:
            if key.startswith("snapshots/"):
                with self._lock:
                    if self.failed < self.failures:
                        self.failed += 1
                        raise RemoteError("injected manifest failure")
            self.inner.write(key, data)

    repo = Repository(ManifestFails(inner, failures=1), CHUNK)
    write(root / "f", data(4, 2 * CHUNK))
    h = harness_factory(repo, root)
    first = h.worker.request("commit")
    assert first.wait(DEADLINE)
    assert first.error is not None
    assert repo.snapshots() == []
    second = h.worker.request("commit")
    assert second.wait(DEADLINE)
    assert second.error is None
    assert second.manifest is not None
    assert second.manifest.new_chunks == 0
    assert len(repo.snapshots()) == 1


def test_lease_lost_fails_all_later_requests(
    local_repo: Repository, root: Path, harness_factory: Callable[..., Harness]
) -> None:
    def lost() -> None:
        raise LeaseLostError("taken over by host x")

    write(root / "f", b"x")
    h = harness_factory(local_repo, root, may_write=lost)
    first = h.worker.request("commit")
    assert first.wait(DEADLINE)
    assert first.error is not None
    assert "taken over" in first.error
    later = h.worker.request("final")
    assert later.wait(DEADLINE)
    assert later.error is not None
    assert "taken over" in later.error
    assert local_repo.snapshots() == []


def test_stop_ends_the_thread(local_repo: Repository, root: Path) -> None:
    h = Harness(local_repo, root)
    h.worker.start()
    try:
        h.worker.stop()
        h.worker.join(DEADLINE)
        assert not h.worker._thread.is_alive()
    finally:
        h.close()


def test_snapshots_use_old_mtime_files(
    local_repo: Repository, root: Path, harness_factory: Callable[..., Harness]
) -> None:
    """A commit after an unchanged commit reads nothing (stat cache carried over)."""
    write(root / "f", data(5, CHUNK), mtime_ns=OLD_NS)
    h = harness_factory(local_repo, root)
    assert h.worker.request("commit").wait(DEADLINE)
    req = h.worker.request("commit")
    assert req.wait(DEADLINE)
    assert h.wait_for(lambda: len(h.results) == 2)
    assert h.results[1].bytes_read == 0


# ------------------------------------------- a remote that is down for a while


class DownBackend(DelegatingBackend):
    """Every write fails while `down` is set, like a remote that is unreachable."""

    def __init__(self, inner: LocalBackend) -> None:
        super().__init__(inner)
        self.down = threading.Event()
        self.refused = 0

    def write(self, key: str, data: bytes) -> None:
        if self.down.is_set():
            self.refused += 1
            raise RemoteError(f"injected outage writing {key}")
        self.inner.write(key, data)


def _down(
    tmp_path: Path, root: Path, make: Callable[..., Harness], size: int
) -> tuple[DownBackend, Repository, Harness]:
    """A worker on a remote that is down from the start; root/model.pt holds
    data(1, size)."""
    inner = open_backend(str(tmp_path / "remote"))
    assert isinstance(inner, LocalBackend)
    backend = DownBackend(inner)
    repo = Repository(backend, CHUNK)
    write(root / "model.pt", data(1, size))
    h = make(repo, root)
    backend.down.set()
    return backend, repo, h


def _replace(path: Path, content: bytes) -> None:
    """Write-to-temp then rename, as torch.save users do."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    tmp.replace(path)


def test_commit_during_outage_is_held_and_uploaded_when_the_remote_returns(
    tmp_path: Path, root: Path, harness_factory: Callable[..., Harness]
) -> None:
    backend, repo, h = _down(tmp_path, root, harness_factory, 2 * CHUNK)

    req = h.worker.commit()
    assert req.wait(DEADLINE), "the child is answered without waiting for the remote"
    assert req.manifest is None
    assert req.error is not None
    assert "kept and uploaded when the remote answers" in req.error
    assert h.worker.holding, "the commit is held, not dropped"
    # The training run goes on and replaces the file after the commit.
    _replace(root / "model.pt", data(2, 2 * CHUNK))
    flush = h.worker.request("final")  # a flush waits for the held commit
    assert not flush.wait(0.2)
    backend.down.clear()

    assert flush.wait(DEADLINE)
    assert flush.error is None
    assert flush.manifest is not None
    [ref] = repo.snapshots()
    assert ref.id == flush.manifest.id
    m = repo.load(ref)
    assert m.reason == "commit"
    got = b"".join(repo.get_chunk(d) for d in m.entries[0].chunks)
    assert got == data(1, 2 * CHUNK), "the held commit is the state at the commit call"
    assert h.wait_for(lambda: not h.worker.holding)
    assert h.worker.stats.last_error is None
    assert h.worker.stats.failing_since is None


def test_newer_commit_supersedes_the_held_one_newest_wins(
    tmp_path: Path, root: Path, harness_factory: Callable[..., Harness]
) -> None:
    backend, repo, h = _down(tmp_path, root, harness_factory, CHUNK)

    first = h.worker.commit()
    assert first.wait(DEADLINE) and first.error is not None
    early_flush = h.worker.request("final")  # waits on the first held commit...
    _replace(root / "model.pt", data(2, CHUNK))
    second = h.worker.commit()  # ...and then on the one that replaced it
    assert second.wait(DEADLINE) and second.error is not None
    assert h.worker.stats.superseded == 1
    assert h.worker.holding
    flush = h.worker.request("final")  # waits for the held commit, not the directory
    _replace(root / "model.pt", data(3, CHUNK))
    backend.down.clear()

    for f in (early_flush, flush):
        assert f.wait(DEADLINE)
        assert f.error is None
        assert f.manifest is not None
    [ref] = repo.snapshots()
    assert early_flush.manifest is not None and early_flush.manifest.id == ref.id
    got = repo.get_chunk(repo.load(ref).entries[0].chunks[0])
    assert got == data(2, CHUNK), "the newest commit wins; the older one is not uploaded"


def test_held_commit_pin_is_released_when_superseded(
    tmp_path: Path, root: Path, harness_factory: Callable[..., Harness]
) -> None:
    backend, _repo, h = _down(tmp_path, root, harness_factory, CHUNK)
    assert h.worker.commit().wait(DEADLINE)
    held = h.worker._held_request()
    assert held is not None and held.pinned is not None
    pinned = held.pinned
    assert pinned.fds, "held: the pinned descriptors stay open for the retry"
    assert h.worker.commit().wait(DEADLINE)
    assert h.worker.stats.superseded == 1
    assert pinned.fds == {}, "superseded: its descriptors are closed"
    backend.down.clear()


class BlockingDeletes(DelegatingBackend):
    """Deletes wait until `go` is set; `deleting` is set at the first one."""

    def __init__(self, inner: LocalBackend) -> None:
        super().__init__(inner)
        self.go = threading.Event()
        self.deleting = threading.Event()

    def delete(self, key: str) -> None:
        self.deleting.set()
        if not self.go.wait(DEADLINE):
            raise RemoteError("the test never let the delete go")
        self.inner.delete(key)


def test_retention_runs_after_the_commit_is_answered(
    tmp_path: Path, root: Path, harness_factory: Callable[..., Harness]
) -> None:
    """A commit returns once its manifest is durable; deleting what retention
    drops (slow for big chunks) comes after, and still happens."""
    backend = BlockingDeletes(LocalBackend(tmp_path / "remote"))
    repo = Repository(backend, chunk_size=CHUNK)
    h = harness_factory(repo, root)
    for i in range(4):  # keep=3: the fourth snapshot makes retention delete the first
        write(root / "model.pt", data(i, CHUNK + i), mtime_ns=OLD_NS + i)
        req = h.worker.request("commit")
        assert req.wait(DEADLINE), f"commit {i} was not answered while deletes were blocked"
        assert req.error is None and req.manifest is not None
    assert backend.deleting.wait(DEADLINE), "retention never ran"
    assert len(repo.snapshots()) in (3, 4)  # the oldest manifest may be gone already
    backend.go.set()
    assert h.wait_for(lambda: len(repo.snapshots()) == 3)
    kept = {d for ref in repo.snapshots() for d in repo.load(ref).chunk_digests()}
    assert h.wait_for(lambda: repo.list_chunks() == kept), "the first snapshot's chunks stay"


def test_retention_of_the_last_snapshot_runs_before_the_worker_ends(
    local_repo: Repository, root: Path, harness_factory: Callable[..., Harness]
) -> None:
    """--keep holds when a run ends: the prune after the last snapshot (a
    final flush) runs before the thread the supervisor joins has ended."""
    h = harness_factory(local_repo, root)
    for i in range(4):
        write(root / "model.pt", data(i, CHUNK + i), mtime_ns=OLD_NS + i)
        req = h.worker.request("commit")
        assert req.wait(DEADLINE) and req.error is None
    h.worker.stop()
    h.worker.join(DEADLINE)
    assert len(local_repo.snapshots()) == 3  # keep=3


def test_a_flush_is_not_durable_while_a_file_cannot_be_read(
    local_repo: Repository,
    root: Path,
    harness_factory: Callable[..., Harness],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The snapshot is written (the rest of the directory is newer), but a
    request waiting for the directory to be durable is told which file is not
    in it and why, and that asking again does not help."""
    write(root / "model.pt", b"model")
    optim = write(root / "optim.pt", b"optim")
    real = os.open

    def refuse(path: object, flags: int, *args: object, **kw: object) -> int:
        if os.fspath(path) == str(optim):  # type: ignore[arg-type]
            raise PermissionError(errno.EACCES, "Permission denied", str(optim))
        return real(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refuse)
    h = harness_factory(local_repo, root)
    req = h.worker.request("final")
    assert req.wait(DEADLINE)
    assert req.manifest is not None and [e.path for e in req.manifest.entries] == ["model.pt"]
    assert req.error is not None and not req.retryable
    assert "optim.pt (Permission denied)" in req.error and req.manifest.id in req.error
    monkeypatch.undo()
    again = h.worker.request("final")
    assert again.wait(DEADLINE)
    assert again.error is None
    assert again.manifest is not None and {e.path for e in again.manifest.entries} == {
        "model.pt",
        "optim.pt",
    }


def test_a_commit_of_an_unreadable_file_is_refused_at_once(
    local_repo: Repository,
    root: Path,
    harness_factory: Callable[..., Harness],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pinning the directory fails naming the file (the control socket says
    so to `ckpt commit`); nothing is queued."""
    write(root / "model.pt", b"model")
    optim = write(root / "optim.pt", b"optim")
    real = os.open

    def refuse(path: object, flags: int, *args: object, **kw: object) -> int:
        if os.fspath(path) == str(optim):  # type: ignore[arg-type]
            raise PermissionError(errno.EACCES, "Permission denied", str(optim))
        return real(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refuse)
    h = harness_factory(local_repo, root)
    with pytest.raises(UnreadableError, match=r"optim\.pt cannot be read"):
        h.worker.commit()
    assert not h.worker.busy
    assert local_repo.snapshots() == []
