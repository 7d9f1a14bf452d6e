"""A file ckpt cannot read is never left out silently (README "Consistency
levels"): a commit or a push that needs it fails naming it and the reason;
an automatic snapshot keeps its previous version and says so, and the final
state is not called durable.

Injected: a file of the checkpoint dir made unreadable (mode 000) by the
child, with ckpt and its child running without CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH (tests run as root, which reads any file whatever its
mode: `setpriv` drops both from the bounding set; skipped, saying why, where
that cannot be done). Asserted: which snapshots exist and what a restore
gives, file by file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from faults._tally import record
from integration._util import (
    CKPT,
    PY,
    Running,
    error_lines,
    manifests,
    read_tree,
    restore_into,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

KIND = "data-loss guard: unreadable file"


def _no_dac(tmp_path: Path) -> list[str]:
    """The argv prefix that runs a command unable to read a mode-000 file of
    its own user (nothing when not root); skip if there is none."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed: root would read any file")
    prefix = [
        setpriv,
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-dac_override,-dac_read_search",
        "--",
    ]
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    res = subprocess.run([*prefix, "cat", str(probe)], capture_output=True, check=False)
    probe.unlink()
    if res.returncode == 0:
        pytest.skip("setpriv could not drop CAP_DAC_OVERRIDE here (a container without it?)")
    return prefix


def _ckpt(
    prefix: list[str], args: list[str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, str(CKPT), *args],
        cwd=cwd,
        env=dict(os.environ),
        text=True,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _paths(m: dict[str, Any]) -> set[str]:
    return {e["path"] for e in m["entries"]}


#: argv: the ckpt binary, the report file. Commits {model, optim} v1; writes
#: v2 of both, makes optim.pt unreadable and commits; makes it readable again
#: and commits. Reports each `ckpt commit`'s exit status and stderr.
COMMITTER = """
import json, os, subprocess, sys
from pathlib import Path
d = Path(os.environ["CKPT_DIR"])
ckpt, report = sys.argv[1], Path(sys.argv[2])

def save(name, text):
    tmp = d / (name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, d / name)

def commit():
    res = subprocess.run([ckpt, "commit"], capture_output=True, text=True)
    return {"rc": res.returncode, "stderr": res.stderr}

out = {}
save("model.pt", "model v1"); save("optim.pt", "optim v1")
out["v1"] = commit()
save("model.pt", "model v2"); save("optim.pt", "optim v2")
os.chmod(d / "optim.pt", 0)
out["unreadable"] = commit()
os.chmod(d / "optim.pt", 0o600)
out["readable again"] = commit()
report.write_text(json.dumps(out))
"""


def test_a_commit_fails_naming_a_file_it_cannot_read(tmp_path: Path, remote: Path) -> None:
    """Injected: `ckpt commit` while optim.pt is mode 000 (the child's chmod).
    Asserted: that commit exits non-zero naming optim.pt and the reason, and
    writes no snapshot; every snapshot holds optim.pt; the commits before and
    after it are durable, and a restore gives v2 of both files."""
    prefix = _no_dac(tmp_path)
    script = tmp_path / "committer.py"
    script.write_text(COMMITTER)
    report = tmp_path / "report.json"
    args = ["run", "--dir", str(tmp_path / "ck"), "--remote", str(remote), "--backoff", "0"]
    res = _ckpt(prefix, [*args, "--", PY, str(script), str(CKPT), str(report)], tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(report.read_text())

    assert out["v1"]["rc"] == 0, out["v1"]
    bad = out["unreadable"]
    assert bad["rc"] != 0, (
        f"`ckpt commit` with optim.pt unreadable exited 0 ({bad['stderr'].strip()}); "
        f"snapshots: {[sorted(_paths(m)) for m in manifests(remote)]}"
    )
    assert "optim.pt" in bad["stderr"] and "Permission denied" in bad["stderr"], bad
    assert bad["rc"] == 65, bad  # the same commit fails again: not 69, "retry later"
    assert out["readable again"]["rc"] == 0, out["readable again"]
    written = manifests(remote)
    assert len(written) == 2, [sorted(_paths(m)) for m in written]
    for m in written:
        assert "optim.pt" in _paths(m), f"snapshot {m['id']} lacks optim.pt"
    restored = tmp_path / "restored"
    restore_into(remote, restored, cwd=tmp_path)
    assert read_tree(restored) == {"model.pt": b"model v2", "optim.pt": b"optim v2"}
    record(KIND, 1)


#: argv: the go file. Writes both files, waits for go (a snapshot of them),
#: then writes v2 of both and makes optim.pt unreadable; exits 0 at once.
AUTO = """
import os, sys, time
from pathlib import Path
d = Path(os.environ["CKPT_DIR"])
go = Path(sys.argv[1])

def save(name, text):
    tmp = d / (name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, d / name)

save("model.pt", "model v1"); save("optim.pt", "optim v1")
while not go.exists():
    time.sleep(0.02)
save("model.pt", "model v2"); save("optim.pt", "optim v2")
os.chmod(d / "optim.pt", 0)
"""


def test_an_automatic_snapshot_keeps_the_previous_version_and_is_not_called_durable(
    spawn: Callable[..., Running], tmp_path: Path, remote: Path
) -> None:
    """Injected: optim.pt made unreadable after its v1 was snapshotted, with
    model.pt at v2; the child exits 0. Asserted: ckpt warns naming optim.pt
    and the reason (not "changed while being read"); the final snapshot keeps
    optim.pt v1 beside model.pt v2; the final state is not called durable and
    the run exits 69 (its final state is not durable) with one error line
    naming optim.pt."""
    prefix = _no_dac(tmp_path)
    script = tmp_path / "auto.py"
    script.write_text(AUTO)
    go = tmp_path / "go"
    args = ["run", "--dir", str(tmp_path / "ck"), "--remote", str(remote), "--backoff", "0"]
    run = spawn([*args, "--debounce", "0.2", "--", PY, str(script), str(go)], prefix=prefix)
    wait_for(
        lambda: any({"model.pt", "optim.pt"} <= _paths(m) for m in manifests(remote)),
        what="a snapshot of v1",
        proc=run,
    )
    go.touch()
    status = run.wait()
    stderr = run.stderr()

    assert "final state is durable" not in stderr, stderr
    assert status == 69, stderr
    warnings = [ln for ln in stderr.splitlines() if "optim.pt" in ln and "warning" in ln]
    assert warnings and "Permission denied" in warnings[0], stderr
    assert "changed while being read" not in stderr, stderr
    errors = error_lines(stderr)
    assert any("optim.pt" in ln and "Permission denied" in ln for ln in errors), stderr
    restored = tmp_path / "restored"
    restore_into(remote, restored, cwd=tmp_path)
    assert read_tree(restored) == {"model.pt": b"model v2", "optim.pt": b"optim v1"}
    record(KIND, 1)


@pytest.mark.parametrize(
    ("history", "unreadable"),
    [("first push", "optim.pt"), ("after a push", "optim.pt"), ("after a push", "state/")],
)
def test_a_push_fails_naming_what_it_cannot_read(
    tmp_path: Path, remote: Path, history: str, unreadable: str
) -> None:
    """Injected: `ckpt push` of a dir whose optim.pt, or whose directory
    state/, is mode 000 (to a new remote, and to one holding a snapshot of
    them). Asserted: exit 78 (not a crash, 70), one error line naming it and
    the reason; no snapshot written."""
    prefix = _no_dac(tmp_path)
    src = tmp_path / "src"
    (src / "state").mkdir(parents=True)
    (src / "model.pt").write_text("model v1")
    (src / "optim.pt").write_text("optim v1")
    (src / "state" / "rng").write_text("rng v1")
    if history == "after a push":
        res = _ckpt(prefix, ["push", str(src), str(remote)], tmp_path)
        assert res.returncode == 0, res.stderr
    before = manifests(remote) if remote.exists() else []
    for name in ("model.pt", "optim.pt", "state/rng"):
        (src / name).write_text(name + " v2")
    (src / unreadable).chmod(0)
    try:
        res = _ckpt(prefix, ["push", str(src), str(remote)], tmp_path)
    finally:
        (src / unreadable).chmod(0o700)

    after = manifests(remote) if remote.exists() else []
    assert res.returncode == 78, (res.returncode, res.stderr, [sorted(_paths(m)) for m in after])
    (line,) = error_lines(res.stderr)
    assert unreadable in line and "Permission denied" in line, line
    assert "changed while being read" not in res.stderr
    assert after == before
    record(KIND, 1)


def test_a_start_over_a_dir_it_cannot_read_is_one_line(tmp_path: Path, remote: Path) -> None:
    """Injected: --dir holding b.txt and a subdirectory of mode 000 (another
    tool's, or a chmod gone wrong), the remote holding a snapshot. Asserted:
    `ckpt run` exits 78 with one line naming the subdirectory (it used to
    crash, 70, with a traceback in a crash log), runs no child, and nothing
    in --dir is replaced or moved."""
    prefix = _no_dac(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("the remote's")
    assert _ckpt(prefix, ["push", str(src), str(remote)], tmp_path).returncode == 0
    ck = tmp_path / "ck"
    (ck / "locked").mkdir(parents=True)
    (ck / "locked" / "f").write_text("private")
    (ck / "b.txt").write_text("local")
    (ck / "locked").chmod(0)
    ran = tmp_path / "ran"
    try:
        args = ["run", "--dir", str(ck), "--remote", str(remote), "--", "touch", str(ran)]
        res = _ckpt(prefix, args, tmp_path)
    finally:
        (ck / "locked").chmod(0o755)
    assert res.returncode == 78, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("ckpt: error:")]
    assert len(errors) == 1 and "locked/" in errors[0] and "--dir" in errors[0], res.stderr
    assert "Traceback" not in res.stderr and "crash" not in res.stderr
    assert not ran.exists()
    assert sorted(p.name for p in ck.iterdir()) == ["b.txt", "locked"]
    assert (ck / "locked" / "f").read_text() == "private"
    record(KIND, 1, case="a --dir that cannot be read at the start")


#: argv: the file, the started marker, the stop file. Rewrites the file in
#: place, 4 KiB at a time round it, with no pause, until the stop file
#: exists; the marker once the first write is done.
REWRITER = """
import os, sys
from pathlib import Path
path, started, stop = sys.argv[1:4]
fd = os.open(path, os.O_WRONLY)
size = os.fstat(fd).st_size
offset = 0
os.pwrite(fd, os.urandom(4096), offset)
Path(started).touch()
while not os.path.exists(stop):
    offset = (offset + 4096) % size
    os.pwrite(fd, os.urandom(4096), offset)
"""


@pytest.mark.parametrize("history", ["first push", "after a push"])
def test_a_push_never_leaves_out_a_file_that_changes_while_it_is_read(
    tmp_path: Path, remote: Path, history: str
) -> None:
    """Injected: data.bin (32 MiB) rewritten in place, without pause, by
    another process for the whole `ckpt push` (to a new remote, and to one
    holding a snapshot of it). The old binary exited 0, "pushed snapshot",
    with data.bin left out, or at its previous version, and a warning
    calling that "kept at their previous version". Asserted: the push exits
    65 with one line naming data.bin and no snapshot is written; or, if the
    writer let one read through whole, the snapshot holds data.bin at a
    version the writer wrote (never left out, never the previous one)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_text("small v1")
    data = src / "data.bin"
    data.write_bytes(os.urandom(32 * 1024 * 1024))
    before: list[dict[str, Any]] = []
    if history == "after a push":
        res = _ckpt([], ["push", str(src), str(remote)], tmp_path)
        assert res.returncode == 0, res.stderr
        before = manifests(remote)
    (src / "small").write_text("small v2")
    script = tmp_path / "rewriter.py"
    script.write_text(REWRITER)
    started, stop = tmp_path / "started", tmp_path / "stop"
    writer = subprocess.Popen([PY, str(script), str(data), str(started), str(stop)])
    try:
        wait_for(started.exists, what="the rewriter's first write")
        res = _ckpt([], ["push", str(src), str(remote)], tmp_path)
    finally:
        stop.touch()
        writer.wait(30)

    after = manifests(remote) if remote.exists() else []
    assert "previous version" not in res.stderr, res.stderr
    if res.returncode == 0:  # one read found no write under way: taken whole
        (new,) = [m for m in after if m not in before]
        entries = {e["path"]: e for e in new["entries"]}
        assert "data.bin" in entries, (res.stderr, sorted(entries))
        assert entries["data.bin"]["size"] == 32 * 1024 * 1024
        old = {e["path"]: e for m in before for e in m["entries"]}
        assert "data.bin" not in old or old["data.bin"]["chunks"] != entries["data.bin"]["chunks"]
        return
    assert res.returncode == 65, (res.returncode, res.stderr)
    (line,) = error_lines(res.stderr)
    assert "data.bin" in line and "changed while" in line, line
    assert after == before
    record("data-loss guard: a file changing while a push reads it", 1)
