"""openfiles: the /proc scan with real processes (a child holding files open
for writing with and without O_APPEND, a grandchild, processes exiting
mid-scan, sockets, pipes, unlinked files, odd names) and the appender /
rewriter rule as a pure function."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt_cli import openfiles
from ckpt_cli import processes as subtree
from ckpt_cli.openfiles import Role, prefix_kept, writer_kind

pytestmark = pytest.mark.skipif(not subtree.HAVE_PROC, reason="needs Linux /proc")

W = os.O_WRONLY | os.O_CREAT
HOLD = """
import json, os, socket, sys
root, spec = sys.argv[1], json.loads(sys.argv[2])
keep = [socket.socketpair(), os.pipe()]
fds = {}
for name, flags, unlink in spec:
    fds[name] = os.open(os.path.join(root, name), flags, 0o644)
    if unlink:
        os.unlink(os.path.join(root, name))
print(json.dumps(fds), flush=True)
sys.stdin.read()
"""


class Holder:
    """A child process holding files open until stopped."""

    def __init__(self, root: Path, spec: list[tuple[str, int, bool]], prefix: list[str]) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", HOLD, str(root), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.fds: dict[str, int] = json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture
def hold(tmp_path: Path) -> Iterator[Any]:
    started: list[Holder] = []

    def start(
        spec: list[tuple[str, int] | tuple[str, int, bool]],
        root: Path | None = None,
        prefix: list[str] | None = None,
    ) -> Holder:
        full = [(s[0], s[1], len(s) > 2 and bool(s[2])) for s in spec]
        h = Holder(root or tmp_path, full, prefix or [])
        started.append(h)
        return h

    yield start
    for h in started:
        h.proc.kill()
        h.proc.wait()


def test_a_file_written_in_place_is_found_without_append(tmp_path: Path, hold: Any) -> None:
    h = hold([("model.pt", W | os.O_TRUNC), ("reader.bin", os.O_RDONLY | os.O_CREAT)])
    got = openfiles.scan([h.proc.pid], tmp_path)
    assert got.complete and got.pids == 1
    assert list(got.files) == ["model.pt"]  # the read-only one is not a writer
    (holder,) = got.files["model.pt"]
    assert (holder.pid, holder.fd, holder.append) == (h.proc.pid, h.fds["model.pt"], False)
    assert holder.flags & openfiles.O_ACCMODE == os.O_WRONLY
    flags = got.flags("model.pt")
    kind = writer_kind("model.pt", flags, size=0, prev_size=None, prefix_unchanged=None)
    assert kind.role is Role.REWRITER


def test_an_appender_is_found_with_o_append(tmp_path: Path, hold: Any) -> None:
    h = hold([("metrics.jsonl", W | os.O_APPEND), ("state.db", os.O_RDWR | os.O_CREAT)])
    got = openfiles.scan([h.proc.pid], tmp_path)
    assert got.files["metrics.jsonl"][0].append
    assert not got.files["state.db"][0].append
    kind = writer_kind(
        "metrics.jsonl", got.flags("metrics.jsonl"), size=10, prev_size=4, prefix_unchanged=None
    )
    assert kind.appender and "O_APPEND" in kind.reason
    assert (
        writer_kind(
            "state.db", got.flags("state.db"), size=9, prev_size=9, prefix_unchanged=None
        ).role
        is Role.REWRITER
    )


def test_sockets_pipes_readers_and_files_elsewhere_are_left_out(tmp_path: Path, hold: Any) -> None:
    root = tmp_path / "ck"
    beside = tmp_path / "ck2"  # shares root's name as a string prefix
    root.mkdir()
    beside.mkdir()
    h = hold(
        [("../ck2/x.pt", W), ("../elsewhere.pt", W), ("r.pt", os.O_RDONLY | os.O_CREAT)], root=root
    )
    got = openfiles.scan([h.proc.pid], root)
    assert got.complete and got.files == {}
    assert got.fds >= 7  # stdio, the socket pair, the pipe, the three files


def test_a_grandchild_is_found_through_the_subtree(tmp_path: Path, hold: Any) -> None:
    sub = tmp_path / "out" / "checkpoint-2"
    sub.mkdir(parents=True)
    h = hold(
        [("out/checkpoint-2/optimizer.pt", os.O_RDWR | os.O_CREAT)],
        prefix=["sh", "-c", '"$@"; exit 0', "sh"],
    )
    below = [p.pid for p in subtree.live(h.proc.pid)]
    assert below, "the holder runs as the shell's child"
    got = openfiles.scan([h.proc.pid, *below], tmp_path)
    (holder,) = got.files["out/checkpoint-2/optimizer.pt"]
    assert holder.pid in below and holder.pid != h.proc.pid
    assert openfiles.job_scan(tmp_path, below=h.proc.pid).files.keys() == got.files.keys()


def test_unlinked_files_are_left_out_and_odd_names_are_kept(tmp_path: Path, hold: Any) -> None:
    odd = "we\nird (deleted)"
    h = hold([(odd, W), ("gone.pt", W, True), ("ünï côdé.bin", W)])
    got = openfiles.scan([h.proc.pid], tmp_path)
    assert set(got.files) == {odd, "ünï côdé.bin"}
    assert got.files[odd][0].fd == h.fds[odd]


def test_processes_exiting_mid_scan_are_simply_not_there(tmp_path: Path) -> None:
    """Children open a file for writing and exit at staggered times while
    scans run back to back: no scan fails, every holder found is one of
    them, and once they are gone nothing is open."""
    code = (
        "import os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)\n"
        "time.sleep(float(sys.argv[2]))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / f"f{i}.log"), str(0.05 * (i % 10))]
        )
        for i in range(20)
    ]
    pids = [p.pid for p in procs]
    seen: set[str] = set()
    try:
        while any(p.poll() is None for p in procs):
            got = openfiles.scan(pids, tmp_path)
            assert all(h.pid in pids for hs in got.files.values() for h in hs)
            seen |= set(got.files)
    finally:
        for p in procs:
            p.wait(timeout=60)
    assert seen, "no child was ever seen holding its file"
    got = openfiles.scan([*pids, 2**22 + 7], tmp_path)  # exited and reaped, and no such pid
    assert got.files == {} and got.complete and got.pids == 0


def test_a_zombie_holds_nothing(tmp_path: Path) -> None:
    p = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os; os.open({str(tmp_path / 'z.pt')!r}, os.O_WRONLY | os.O_CREAT)",
        ]
    )
    deadline = time.monotonic() + 60
    while (proc := subtree.read_proc(p.pid)) is not None and proc.state != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        assert openfiles.scan([p.pid], tmp_path).files == {}
    finally:
        p.wait()


def test_a_scan_past_its_caps_says_it_is_incomplete(tmp_path: Path, hold: Any) -> None:
    h = hold([(f"f{i}.pt", W) for i in range(40)])
    got = openfiles.scan([h.proc.pid], tmp_path, max_fds=10)
    assert not got.complete and got.fds == 10
    assert not openfiles.scan([h.proc.pid, h.proc.pid], tmp_path, budget=0).complete
    full = openfiles.scan([h.proc.pid, h.proc.pid], tmp_path)  # a pid given twice is read once
    assert full.complete and len(full.files) == 40 and full.pids == 1


def test_a_root_reached_through_a_symlink(tmp_path: Path, hold: Any) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    h = hold([("sub.pt", W)], root=real)
    assert set(openfiles.scan([h.proc.pid], tmp_path / "link").files) == {"sub.pt"}


def test_holders_with_and_without_append_do_not_make_an_appender(tmp_path: Path, hold: Any) -> None:
    a = hold([("events.log", W | os.O_APPEND)])
    b = hold([("events.log", W)])
    got = openfiles.scan([a.proc.pid, b.proc.pid], tmp_path)
    assert len(got.files["events.log"]) == 2
    flags = got.flags("events.log")
    assert flags is not None and not flags & os.O_APPEND
    assert openfiles.scan([a.proc.pid], tmp_path).flags("events.log") is not None
    assert got.flags("missing") is None


# -- the rule


APPEND = os.O_WRONLY | os.O_APPEND


@pytest.mark.parametrize(
    ("name", "flags", "size", "prev", "prefix", "role", "why"),
    [
        ("m.pt", os.O_WRONLY, 10, 100, None, Role.REWRITER, "shrank"),
        ("run.log", APPEND, 10, 100, None, Role.REWRITER, "shrank"),  # truncated under O_APPEND
        ("run.log", APPEND, 200, 100, False, Role.REWRITER, "rewrote"),
        ("m.pt", os.O_RDWR, 200, 100, False, Role.REWRITER, "rewrote"),
        ("metrics.jsonl", APPEND, 200, 100, None, Role.APPENDER, "O_APPEND"),
        ("x.bin", APPEND, 5, None, None, Role.APPENDER, "O_APPEND"),
        ("events.out.tfevents.1.host", os.O_WRONLY, 300, 100, True, Role.APPENDER, "only grew"),
        ("data.bin", os.O_WRONLY, 100, 100, True, Role.APPENDER, "only grew"),
        ("events.out.tfevents.1.host", os.O_WRONLY, 40, None, None, Role.APPENDER, "a log"),
        ("logs/train.csv", os.O_WRONLY, 40, None, None, Role.APPENDER, "a log"),
        ("train.log", os.O_WRONLY, 140, 100, None, Role.APPENDER, "a log"),
        ("train.log", os.O_WRONLY, 140, 100, False, Role.REWRITER, "rewrote"),
        ("model.pt", os.O_WRONLY, 140, None, None, Role.REWRITER, "open for writing"),
        ("model.pt", os.O_WRONLY, 140, 100, None, Role.REWRITER, "open for writing"),
        ("model.pt", None, 140, 100, None, Role.REWRITER, "changed"),
        ("model.pt", None, 140, 100, True, Role.APPENDER, "only grew"),
        ("model.pt", None, 40, 100, True, Role.REWRITER, "shrank"),
    ],
)
def test_writer_kind(
    name: str,
    flags: int | None,
    size: int,
    prev: int | None,
    prefix: bool | None,
    role: Role,
    why: str,
) -> None:
    got = writer_kind(name, flags, size=size, prev_size=prev, prefix_unchanged=prefix)
    assert got.role is role and why in got.reason


def test_prefix_kept_from_chunk_digests() -> None:
    old = ["a", "b", "c"]  # 2 full chunks of 4 and a tail of 2: 10 bytes
    assert prefix_kept(old, 10, ["a", "b", "x", "y"], 4, tail_digest="c") is True
    assert prefix_kept(old, 10, ["a", "b", "x", "y"], 4, tail_digest="z") is False
    assert prefix_kept(old, 10, ["a", "q", "x"], 4, tail_digest="c") is False
    assert prefix_kept(old, 10, ["a", "b", "x"], 4, tail_digest=None) is None
    assert prefix_kept(["a", "b"], 8, ["a", "b", "n"], 4, tail_digest=None) is True
    assert prefix_kept(["a", "b"], 8, ["a"], 4, tail_digest=None) is False
    assert prefix_kept([], 0, ["n"], 4, tail_digest=None) is True
