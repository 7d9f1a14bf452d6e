"""progress + the snapshotter with checks: what an automatic snapshot waits
for and what a commit refuses, on real files held open by real processes.

- In progress: a file held open for writing by a rewriter; a file failing
  its format check (open or not); a checkpoint directory missing its marker.
- Not in progress: appenders (O_APPEND, a log's name, old bytes kept, grew
  since the last look), taken as their prefix; a recognised format that only
  grows is still checked.
- Carried: a file the last snapshot listed as unverified, unchanged and still
  torn, is listed again but never waited for.
- The wait's reports (`wait_news`, a pure decision).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt_cli import openfiles
from ckpt_cli import processes as subtree
from ckpt_cli.formats import CommandCheck, Registry
from ckpt_cli.progress import Auto, NotWholeError, check_reason
from ckpt_cli.repository import Repository
from ckpt_cli.snapshotter import SnapshotResult, Snapshotter
from ckpt_cli.worker import WAIT_SAY, Waiting, wait_news

from .helpers import CHUNK, data, write

pytestmark = pytest.mark.skipif(not subtree.HAVE_PROC, reason="needs Linux /proc")

MakeSnap = Callable[..., Snapshotter]

HOLD = """
import json, os, sys
root, spec = sys.argv[1], json.loads(sys.argv[2])
fds = {name: os.open(os.path.join(root, name), flags, 0o644) for name, flags in spec}
print(json.dumps(fds), flush=True)
for line in sys.stdin:  # "NAME DATA": write DATA (hex) through NAME's descriptor
    name, hexdata = line.split()
    os.write(fds[name], bytes.fromhex(hexdata))
    print("ok", flush=True)
"""


class Holder:
    """A child process holding files open for writing, writing on request."""

    def __init__(self, root: Path, spec: list[tuple[str, int]]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(root), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.fds = json.loads(self.proc.stdout.readline())

    def write(self, name: str, content: bytes) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{name} {content.hex()}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def scan(self, root: Path) -> openfiles.OpenScan:
        return openfiles.scan([self.proc.pid], root)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def hold(root: Path) -> Iterator[Callable[..., Holder]]:
    started: list[Holder] = []

    def start(spec: list[tuple[str, int]]) -> Holder:
        h = Holder(root, spec)
        started.append(h)
        return h

    yield start
    for h in started:
        h.proc.kill()
        h.proc.wait()


def zip_bytes(seed: int, size: int = 3 * CHUNK) -> bytes:
    """A whole zip (what torch.save writes): stored, one member."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data(seed, size))
    return buf.getvalue()


def snap(
    local_repo: Repository,
    root: Path,
    make_snapshotter: MakeSnap,
    registry: Registry | None = None,
) -> Snapshotter:
    return make_snapshotter(local_repo, root, checks=registry or Registry())


def take(s: Snapshotter, scan: Callable[[], openfiles.OpenScan] | None = None, **kw: Any) -> Any:
    return s.snapshot(reason="change", auto=Auto(scan, **kw))


# ---------------------------------------------------------------- checks


def test_a_torn_file_holds_the_snapshot_back_and_nothing_is_read(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    whole = zip_bytes(1)
    write(root / "model.pt", whole)
    write(root / "notes.txt", b"notes")
    s = snap(local_repo, root, make_snapshotter)
    first: SnapshotResult = take(s)
    assert first.manifest is not None and first.manifest.verified is True
    assert {e.path: e.check for e in first.manifest.files} == {"model.pt": "zip", "notes.txt": ""}

    write(root / "model.pt", zip_bytes(2)[: len(whole) // 2])  # torn, closed
    write(root / "notes.txt", b"notes 2")
    held: SnapshotResult = take(s)
    assert held.manifest is None and held.files_read == 0
    assert list(held.waiting) == ["model.pt"]
    assert held.waiting["model.pt"].startswith("fails the zip check: ")
    assert s.parent is first.manifest  # the previous snapshot stays the newest

    anyway: SnapshotResult = take(s, take_anyway=True)
    m = anyway.manifest
    assert m is not None and m.verified is False
    assert m.unverified == (("model.pt", held.waiting["model.pt"]),)


def test_a_file_open_for_writing_is_in_progress_whatever_its_format(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, hold: Any
) -> None:
    write(root / "state.bin", b"old state")
    s = snap(local_repo, root, make_snapshotter)
    assert take(s).manifest is not None
    h = hold([("state.bin", os.O_WRONLY | os.O_TRUNC)])
    h.write("state.bin", b"new")
    held = take(s, lambda: h.scan(root))
    assert held.waiting == {"state.bin": f"open for writing by pid {h.proc.pid} (python)"}


def test_appenders_are_taken_as_their_prefix(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, hold: Any
) -> None:
    """O_APPEND, a log's name, and (for a file the last snapshot holds) old
    bytes kept: appenders, never waited for; what they hold is taken."""
    write(root / "a.txt", b"")
    write(root / "run.log", b"")
    write(root / "grows.dat", data(1, 2 * CHUNK + 10))
    s = snap(local_repo, root, make_snapshotter)
    assert take(s).manifest is not None
    h = hold(
        [
            ("a.txt", os.O_WRONLY | os.O_APPEND),
            ("run.log", os.O_WRONLY),
            ("grows.dat", os.O_WRONLY),
        ]
    )
    h.write("a.txt", b"line 1\n")
    h.write("run.log", b"line 1\n")
    with open(root / "grows.dat", "ab") as f:  # grows; its holder never wrote
        f.write(b"more")
    result = take(s, lambda: h.scan(root))
    assert result.waiting == {}
    m = result.manifest
    assert m is not None and m.verified is True
    assert result.appenders == {"a.txt": 7, "run.log": 7, "grows.dat": 2 * CHUNK + 14}
    assert {e.path: e.size for e in m.files} == result.appenders


def test_a_rewriter_of_bytes_the_last_snapshot_holds_is_in_progress(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, hold: Any
) -> None:
    write(root / "grows.dat", data(1, 2 * CHUNK + 10))
    s = snap(local_repo, root, make_snapshotter)
    assert take(s).manifest is not None
    h = hold([("grows.dat", os.O_WRONLY)])
    h.write("grows.dat", b"X" * 100)  # over its first bytes, in place
    with open(root / "grows.dat", "ab") as f:
        f.write(b"more")
    assert list(take(s, lambda: h.scan(root)).waiting) == ["grows.dat"]


def test_a_new_file_that_only_grows_between_looks_is_an_appender(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, hold: Any
) -> None:
    """Rule 6: no earlier version, not a log's name, no O_APPEND: in progress
    at the first look; once it grew with the bytes seen then unchanged, an
    appender. A zip growing the same way is a save in progress: checked."""
    write(root / "keep.txt", b"x")
    s = snap(local_repo, root, make_snapshotter)
    assert take(s).manifest is not None
    whole = zip_bytes(3)
    h = hold([("metrics.txt", os.O_WRONLY | os.O_CREAT), ("model.pt", os.O_WRONLY | os.O_CREAT)])
    h.write("metrics.txt", b"step 1\n")
    h.write("model.pt", whole[: len(whole) // 3])
    first = take(s, lambda: h.scan(root))
    assert set(first.waiting) == {"metrics.txt", "model.pt"}
    h.write("metrics.txt", b"step 2\n")
    h.write("model.pt", whole[len(whole) // 3 : 2 * len(whole) // 3])
    second = take(s, lambda: h.scan(root))
    assert set(second.waiting) == {"model.pt"}
    assert second.waiting["model.pt"].startswith("fails the zip check")
    assert "metrics.txt" in second.appenders
    h.write("metrics.txt", b"step 3\n")
    h.write("model.pt", whole[2 * len(whole) // 3 :])
    third = take(s, lambda: h.scan(root))  # whole, still open: only its bytes tell
    assert third.waiting == {} and third.manifest is not None
    assert {e.path: e.check for e in third.manifest.files}["model.pt"] == "zip"


def test_a_torn_file_left_unchanged_is_carried_not_waited_for(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    whole = zip_bytes(4)
    write(root / "model.pt", whole[: len(whole) // 2])
    s = snap(local_repo, root, make_snapshotter)
    held = take(s)
    assert list(held.waiting) == ["model.pt"]
    first = take(s, take_anyway=True).manifest
    assert first is not None and first.verified is False
    write(root / "other.txt", b"other")
    second: SnapshotResult = take(s)
    assert second.waiting == {}
    m = second.manifest
    assert m is not None and m.verified is False and [p for p, _ in m.unverified] == ["model.pt"]
    write(root / "model.pt", whole)
    m3 = take(s).manifest
    assert m3 is not None and m3.verified is True and m3.unverified == ()


def test_a_snapshot_taken_unverified_is_taken_again_once_the_same_files_are_whole(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, hold: Any
) -> None:
    write(root / "a.dat", b"a")
    s = snap(local_repo, root, make_snapshotter)
    assert take(s).manifest is not None
    h = hold([("a.dat", os.O_WRONLY)])
    h.write("a.dat", b"b")
    m = take(s, lambda: h.scan(root), take_anyway=True).manifest
    assert m is not None and m.verified is False
    h.proc.kill()
    h.proc.wait()
    again = take(s, lambda: openfiles.scan([], root)).manifest
    assert again is not None and again.verified is True and again.parent == m.id


def test_a_checkpoint_dir_missing_its_marker_is_in_progress(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    write(root / "checkpoint-2" / "config.json", b"{}")
    write(root / "checkpoint-2" / "trainer_state.json", b"{}")
    s = snap(local_repo, root, make_snapshotter)
    assert take(s).manifest is not None
    write(root / "checkpoint-4" / "config.json", b"{}")
    held = take(s)
    assert list(held.waiting) == ["checkpoint-4"]
    assert held.waiting["checkpoint-4"].startswith("fails the hf-trainer check: no trainer_state")
    write(root / "checkpoint-4" / "trainer_state.json", b"{}")
    m = take(s).manifest
    assert m is not None and m.verified is True
    checks = {e.path: e.check for e in m.entries}
    assert checks["checkpoint-4"] == "hf-trainer" and checks["checkpoint-4/trainer_state.json"]


def test_without_the_builtin_checks_nothing_is_verified(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    write(root / "model.pt", zip_bytes(5)[:100])
    s = snap(local_repo, root, make_snapshotter, Registry(builtin=False))
    m = take(s).manifest
    assert m is not None and m.verified is None and m.files[0].check == ""


def test_a_user_check_decides_for_its_files(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    check = CommandCheck.of("*.state", [sys.executable, "-c", "import sys; sys.exit(1)"])
    write(root / "a.state", b"x")
    s = snap(local_repo, root, make_snapshotter, Registry([check]))
    held = take(s)
    assert list(held.waiting) == ["a.state"]
    assert held.waiting["a.state"].startswith("fails its --check *.state: ")


# ---------------------------------------------------------------- commits


def test_a_commit_pins_and_checks_and_refuses_a_torn_file(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    whole = zip_bytes(6)
    write(root / "model.pt", whole)
    s = snap(local_repo, root, make_snapshotter)
    pinned = s.pin(check=True)
    assert pinned.checks == {"model.pt": "zip"}
    m = s.snapshot(reason="commit", pinned=pinned).manifest
    assert m is not None and m.verified is True and m.files[0].check == "zip"
    write(root / "model.pt", whole[:-10])
    with pytest.raises(NotWholeError) as err:
        s.pin(check=True)
    assert str(err.value).startswith("model.pt fails the zip check: ")
    assert err.value.path == "model.pt"
    assert s.pin().checks is None  # a pin without check: as before


# ---------------------------------------------------------------- the wait's reports


def test_wait_news_says_a_wait_once_it_lasted_and_when_it_changes() -> None:
    files = {"model.pt": "open for writing by pid 1 (python)"}
    w, news = wait_news(None, files, 10.0)
    assert w == Waiting(10.0, files) and news is None
    w, news = wait_news(w, files, 10.0 + WAIT_SAY)
    assert w is not None and w.said and news is not None and news.kind == "waiting"
    w, news = wait_news(w, files, 20.0)
    assert news is None and w is not None and w.since == 10.0
    more = {**files, "optimizer.pt": "fails the zip check: x"}
    w, news = wait_news(w, more, 21.0)
    assert news is not None and news.kind == "waiting" and news.files == more
    done, news = wait_news(w, {}, 22.0)
    assert done is None and news is not None and news.kind == "done" and news.seconds == 12.0
    short, _ = wait_news(None, files, 0.0)
    assert wait_news(short, {}, 1.0) == (None, None)  # never said: nothing to undo
    assert wait_news(w, files, 130.0, settled=True)[1].kind == "settled"  # type: ignore[union-attr]


def test_check_reason_reads_after_a_file_name() -> None:
    from ckpt_cli.formats.checks import Verdict

    assert check_reason(Verdict(False, "zip", "zip: no end record")) == (
        "fails the zip check: no end record"
    )
    assert check_reason(Verdict(False, "command:*.x", "my-verify exited 1")) == (
        "fails its --check *.x: my-verify exited 1"
    )


# ---------------------------------------------------------------- the worker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def worker_for(s: Snapshotter, clock: Clock, news: list[Any], settle: float) -> Any:
    from ckpt_cli.worker import SnapshotWorker

    return SnapshotWorker(
        s,
        debounce=0.1,
        rescan=3600.0,
        keep=100,
        attempt=lambda: 1,
        on_snapshot=lambda _r: None,
        on_error=lambda _m, _d: None,
        clock=clock,
        settle=settle,
        open_scan=lambda: openfiles.scan([], s.root),
        on_wait=news.append,
    )


def test_the_worker_waits_reports_and_after_the_settle_timeout_takes_it_unverified(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    whole = zip_bytes(7)
    write(root / "model.pt", whole)
    s = snap(local_repo, root, make_snapshotter)
    clock, news = Clock(), list[Any]()
    w = worker_for(s, clock, news, settle=60.0)
    first, _ = w._take("change", None)
    assert first.manifest is not None and first.manifest.verified is True
    write(root / "model.pt", whole[:-1])
    held, _ = w._take("change", None)
    assert held.waiting and held.manifest is None and w.waiting is None  # not said yet
    clock.now += WAIT_SAY
    w._take("change", None)
    assert [n.kind for n in news] == ["waiting"]
    said = w.waiting
    assert said is not None and said[1] == held.waiting
    clock.now += 60.0
    taken, _ = w._take("change", None)
    assert taken.manifest is not None and taken.manifest.verified is False
    assert [n.kind for n in news] == ["waiting", "settled"] and w.waiting is None


def test_the_final_flush_does_not_wait(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    write(root / "model.pt", zip_bytes(8)[:50])
    s = snap(local_repo, root, make_snapshotter)
    w = worker_for(s, Clock(), [], settle=600.0)
    result, _ = w._take("final", None, take_anyway=True)
    assert result.manifest is not None and result.manifest.verified is False


def test_an_appender_growing_is_no_activity_but_a_shrink_is(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap
) -> None:
    write(root / "metrics.jsonl", b"1\n")
    write(root / "model.bin", b"m")
    s = snap(local_repo, root, make_snapshotter)
    w = worker_for(s, Clock(), [], settle=600.0)
    w._take("change", None)
    assert not w.busy
    with open(root / "metrics.jsonl", "ab") as f:
        f.write(b"2\n")
    w.changed("modified", ["metrics.jsonl"])
    assert not w.busy  # a log that grew: no activity
    w.changed("modified", ["model.bin"])
    assert w.busy  # anything else is
    w._dirty = False
    write(root / "metrics.jsonl", b"")
    w.changed("modified", ["metrics.jsonl"])
    assert w.busy  # truncated: rewritten, not appended


def test_a_probe_of_a_busy_directory_learns_its_appenders_and_writes_nothing(
    local_repo: Repository, root: Path, make_snapshotter: MakeSnap, hold: Any
) -> None:
    s = snap(local_repo, root, make_snapshotter)
    h = hold([("progress.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND)])
    h.write("progress.txt", b"step 1\n")
    w = worker_for(s, Clock(), [], settle=600.0)
    w.open_scan = lambda: h.scan(root)
    w.changed("modified", ["progress.txt"])
    assert w.busy  # not known yet: activity
    w._dirty = False
    w._probe()
    assert s.parent is None and local_repo.snapshots() == []
    h.write("progress.txt", b"step 2\n")
    w.changed("modified", ["progress.txt"])
    assert not w.busy  # an appender now
