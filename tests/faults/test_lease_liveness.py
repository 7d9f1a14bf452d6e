"""A live writer's lease is never taken (README "One writer per remote"): a
pid means something only in the PID namespace that wrote it, a heartbeat time
only on the clock of the machine that wrote it, so a contender takes a lease
over at once only when its holder is provably gone, and otherwise only after
watching it unchanged for its ttl on the contender's own monotonic clock.

Injected, each against a live holder:
- the holder `ckpt run` in another PID namespace of this host (`unshare
  --pid`), with a pid that does not exist in the contender's namespace;
- a contender whose clock is 5 minutes ahead (libfaketime);
- a holder run with `--lease-timeout inf`, and a lease that says
  `"ttl": Infinity` (what such a run wrote before);
- another machine with this host's name (another boot id);
- `ckpt gc` of a multi-node remote whose clock is 5 minutes ahead while a
  rank's lease beats.
Asserted: the contender is refused (69), one error line naming the holder,
changes nothing, and the holder goes on writing; a dead holder's lease is
still taken over, after the watch. Skipped, saying why, where `unshare` or
`faketime` is missing or cannot be used.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt._contract import ExitCode
from ckpt_cli import processes as subtree
from ckpt_cli.lease import boot_id
from ckpt_cli.manifest import host_name
from faults._proc import read_announce
from faults._tally import record
from integration._util import (
    CKPT,
    PY,
    Running,
    error_lines,
    has_snapshot_with,
    manifests,
    read_tree,
    restore_into,
    run_ckpt,
    wait_for,
)

pytestmark = pytest.mark.timeout(240)

KIND = "lease: live writer kept"

#: argv: ready file, go file, text. Writes a.txt = text, announces itself; once
#: the go file exists writes a.txt = "<text> after go"; then waits.
HOLDER = """
import json, os, sys, time
from pathlib import Path
d = Path(os.environ["CKPT_DIR"])
ready, go, text = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def save(name, value):
    tmp = d / (name + ".tmp")
    tmp.write_text(value)
    os.replace(tmp, d / name)

save("a.txt", text)
part = ready.with_name(ready.name + ".part")
part.write_text(json.dumps({"pid": os.getpid()}))
os.replace(part, ready)
while not go.exists():
    time.sleep(0.02)
save("a.txt", text + " after go")
while True:
    time.sleep(0.05)
"""

#: argv: report file, text. Notes that it ran, writes b.txt = text.
WRITER = """
import os, sys
from pathlib import Path
d = Path(os.environ["CKPT_DIR"])
Path(sys.argv[1]).write_text(os.environ["CKPT_RUN"])
tmp = d / "b.txt.tmp"
tmp.write_text(sys.argv[2])
os.replace(tmp, d / "b.txt")
"""


def _run_args(ckpt_dir: Path, remote: Path, *flags: str) -> list[str]:
    return ["run", "--dir", str(ckpt_dir), "--remote", str(remote), "--backoff", "0", *flags]


def _start_holder(
    spawn: Callable[..., Running],
    tmp_path: Path,
    remote: Path,
    *flags: str,
    prefix: list[str] | None = None,
) -> tuple[Running, Path]:
    """A `ckpt run` whose child wrote a.txt = "holder", snapshotted; returns
    it and the go file that makes its child write again."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    ready, go = tmp_path / "holder-ready.json", tmp_path / "holder-go"
    args = _run_args(tmp_path / "holder-ck", remote, "--debounce", "0.2", *flags)
    holder = spawn(
        [*args, "--", PY, str(script), str(ready), str(go), "holder"],
        name="holder",
        prefix=prefix,
    )
    child = read_announce(ready, what="the holder's child to start", proc=holder)
    if prefix is None:
        holder.extra_pids.append(child["pid"])
    wait_for(lambda: has_snapshot_with(remote, "a.txt"), what="the holder's snapshot", proc=holder)
    return holder, go


def _contend(
    tmp_path: Path, remote: Path, *flags: str, prefix: list[str] | None = None
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """A second `ckpt run` to completion; returns it and its child's report
    file (written only if its child ran)."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    report = tmp_path / f"contender-{uuid.uuid4().hex[:6]}.txt"
    args = _run_args(tmp_path / "contender-ck", remote, *flags)
    res = subprocess.run(
        [*(prefix or []), str(CKPT), *args, "--", PY, str(script), str(report), "contender"],
        cwd=tmp_path,
        env=dict(os.environ),
        text=True,
        capture_output=True,
        timeout=150,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return res, report


def _lease(remote: Path, key: str = "lease.json") -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((remote / key).read_text())
    return doc


def _snapshot_keys(remote: Path) -> list[str]:
    return sorted(p.name for p in (remote / "snapshots").glob("*.json"))


def _assert_refused(
    res: subprocess.CompletedProcess[str], report: Path, holder: dict[str, Any]
) -> str:
    assert res.returncode == 69, (
        f"the contender was not refused (exit {res.returncode}) while the holder "
        f"{holder.get('host')} pid {holder.get('pid')} was live:\n{res.stderr}"
    )
    (line,) = error_lines(res.stderr)
    assert str(holder["host"]) in line and "--lease-timeout" in line, line
    assert "took over" not in res.stderr and "is gone" not in res.stderr, res.stderr
    assert not report.exists(), "the refused run started its child"
    return line


def _assert_holder_goes_on(holder: Running, go: Path, remote: Path, owner: str) -> None:
    """The holder still holds the lease and writes: its child's next state
    becomes a snapshot."""
    assert _lease(remote)["owner"] == owner
    go.touch()
    wait_for(
        lambda: has_snapshot_with(remote, "a.txt", b"holder after go"),
        what="the holder's snapshot after the contender was refused",
        proc=holder,
    )
    assert holder.proc.poll() is None, holder.stderr()
    said = holder.stderr()
    assert not [w for w in ("taken over", "disappeared", "failed", "Traceback") if w in said], said


# ---------------------------------------------------------------- another PID namespace


def _unshare() -> str:
    path = shutil.which("unshare")
    if path is None:
        pytest.skip("unshare (util-linux) is not installed")
    if os.geteuid() != 0:
        pytest.skip("a new PID namespace needs root here")
    probe = subprocess.run(
        [path, "--pid", "--fork", "--mount-proc", "--kill-child", "true"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid does not work here: {probe.stderr.decode().strip()}")
    return path


def _free_pid() -> int:
    """A pid no process of this namespace has, away from where it allocates next."""
    with open("/proc/sys/kernel/pid_max", encoding="ascii") as f:
        pid_max = int(f.read())
    with open("/proc/sys/kernel/ns_last_pid", encoding="ascii") as f:
        last = int(f.read())
    pid = 1000 + (last + pid_max // 2) % (pid_max - 2000)
    while subtree.pid_alive(pid):
        pid += 1
    return pid


def test_a_holder_in_another_pid_namespace_is_not_taken_for_gone(
    spawn: Callable[..., Running], tmp_path: Path, remote: Path
) -> None:
    """Injected: the holder `ckpt run` runs in a new PID namespace, as pid N
    there, and no process N exists in the contender's namespace. Asserted:
    the contender is refused (not "its process N ... is gone"), saying the
    pid is of another namespace; the holder goes on writing. Then the holder's
    namespace is killed (-9): its lease is taken over once stale and watched
    unchanged (--lease-timeout 5), and the holder's snapshots restore."""
    unshare = _unshare()
    pid = _free_pid()
    # pid 1 of the namespace (sh) makes the next pid N, and starts ckpt as it.
    prefix = [unshare, "--pid", "--fork", "--mount-proc", "--kill-child", "--"]
    prefix += ["sh", "-c", 'echo $(($0 - 1)) > /proc/sys/kernel/ns_last_pid && "$@"; exit $?']
    prefix += [str(pid)]
    holder, go = _start_holder(spawn, tmp_path, remote, "--lease-timeout", "5", prefix=prefix)
    doc = _lease(remote)
    assert doc["pid"] == pid and doc["host"] == host_name(), doc
    assert not subtree.pid_alive(pid), f"pid {pid} exists here: the test proves nothing"
    before = _snapshot_keys(remote)

    res, report = _contend(tmp_path, remote, "--lease-timeout", "5")

    line = _assert_refused(res, report, doc)
    assert f"pid {pid} of another PID namespace" in line, line
    assert _snapshot_keys(remote) == before
    _assert_holder_goes_on(holder, go, remote, doc["owner"])

    holder.signal(signal.SIGKILL)  # unshare --kill-child: the whole namespace goes
    holder.wait()
    last = manifests(remote)[-1]
    beat = _lease(remote)["heartbeat"]
    wait_for(lambda: time.time() - beat > 6, what="the dead holder's lease to look stale")
    res, report = _contend(tmp_path, remote, "--lease-timeout", "5")
    assert res.returncode == 0, res.stderr
    assert "took over the lease" in res.stderr and "did not change" in res.stderr, res.stderr
    assert report.exists()
    assert manifests(remote)[-1]["generation"] == last["generation"] + 1
    out = tmp_path / "restored"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {"a.txt": b"holder after go", "b.txt": b"contender"}
    record(KIND, 2, injected="another PID namespace")


# ---------------------------------------------------------------- clocks


def _faketime() -> str:
    path = shutil.which("faketime")
    if path is None:
        pytest.skip("faketime is not installed (Debian package `faketime`; tests/install.sh)")
    return path


def test_a_contender_whose_clock_is_ahead_does_not_take_a_live_lease(
    spawn: Callable[..., Running], tmp_path: Path, remote: Path
) -> None:
    """Injected: a contender whose clock is 5 minutes ahead of the holder's
    (--lease-timeout 5: the lease looks 300 s old to it). Asserted: it
    watches the lease, sees it beat, and is refused (69) without writing a
    snapshot; the holder goes on writing and its state is what restores."""
    faketime = _faketime()
    holder, go = _start_holder(spawn, tmp_path, remote, "--lease-timeout", "5")
    doc = _lease(remote)
    before = _snapshot_keys(remote)

    res, report = _contend(tmp_path, remote, "--lease-timeout", "5", prefix=[faketime, "-f", "+5m"])

    line = _assert_refused(res, report, doc)
    assert "changed while this run watched" in line, line
    assert "by this machine's clock" in res.stderr, "the watch was not announced"
    assert _snapshot_keys(remote) == before, "the contender wrote a snapshot"
    _assert_holder_goes_on(holder, go, remote, doc["owner"])
    assert {m["run"] for m in manifests(remote)} == {doc["owner"]}
    holder.signal(signal.SIGTERM)
    assert holder.wait() == 143, holder.stderr()
    out = tmp_path / "restored"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {"a.txt": b"holder after go"}
    record(KIND, 1, injected="contender clock 5 min ahead")


def _strict_json(data: str) -> dict[str, Any]:
    def refuse(name: str) -> None:
        raise AssertionError(f"lease.json holds {name}: not JSON")

    doc: dict[str, Any] = json.loads(data, parse_constant=refuse)
    return doc


def test_lease_timeout_inf_keeps_a_live_lease(
    spawn: Callable[..., Running], tmp_path: Path, remote: Path
) -> None:
    """Injected: `ckpt run --lease-timeout inf`. Asserted: refused as bad
    input (a flag out of its range: 2, or 78; one line naming the flag), or
    run with a lease in strict JSON
    whose heartbeat thread did not die (no traceback), and a second run is
    refused (69) while it lives."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    ready, go = tmp_path / "ready.json", tmp_path / "go"
    args = _run_args(tmp_path / "holder-ck", remote, "--lease-timeout", "inf")
    holder = spawn([*args, "--", PY, str(script), str(ready), str(go), "holder"], name="holder")

    def started() -> str | None:
        if holder.proc.poll() is not None:
            return "exited"
        return "running" if has_snapshot_with(remote, "a.txt") else None

    if wait_for(started, what="the holder to start or exit") == "exited":
        assert holder.proc.returncode in (ExitCode.USAGE, ExitCode.CONFIG), holder.stderr()
        (line,) = error_lines(holder.stderr())
        assert "--lease-timeout" in line, line
        assert not (remote / "lease.json").exists()
        record(KIND, 1, injected="--lease-timeout inf (refused)")
        return
    holder.extra_pids.append(read_announce(ready, what="the holder's child")["pid"])
    doc = _strict_json((remote / "lease.json").read_text())
    before = _snapshot_keys(remote)

    res, report = _contend(tmp_path, remote)

    _assert_refused(res, report, doc)
    assert _snapshot_keys(remote) == before
    assert "Traceback" not in holder.stderr() and "Exception" not in holder.stderr(), (
        holder.stderr()
    )
    _assert_holder_goes_on(holder, go, remote, doc["owner"])
    _strict_json((remote / "lease.json").read_text())
    record(KIND, 1, injected="--lease-timeout inf")


class ForeignLease:
    """lease.json as a live ckpt elsewhere writes it, beating every 0.3 s
    from a thread (a counter and a heartbeat time per beat)."""

    def __init__(self, path: Path, **fields: Any) -> None:
        self.path = path
        self.doc: dict[str, Any] = {
            "owner": f"run-{uuid.uuid4().hex[:8]}",
            "host": f"other-{uuid.uuid4().hex[:8]}",
            "boot": str(uuid.uuid4()),
            "pid": 4242,
            "heartbeat": time.time(),
            "beat": 0,
            "ttl": 5.0,
            **fields,
        }
        self._stop = threading.Event()
        self.overwritten = False
        self.write()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def write(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(self.path.read_text())["owner"] != self.doc["owner"]:
                self.overwritten = True  # another writer took this live lease
        self.doc["heartbeat"] = time.time()
        self.doc["beat"] += 1
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(self.doc))  # allow_nan: Infinity as written before
        os.replace(tmp, self.path)

    def _beat(self) -> None:
        while not self._stop.wait(0.3):
            self.write()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def _foreign(path: Path, **fields: Any) -> Iterator[ForeignLease]:
    path.parent.mkdir(parents=True, exist_ok=True)
    lease = ForeignLease(path, **fields)
    try:
        yield lease
    finally:
        lease.stop()


def _seed(tmp_path: Path, remote: Path) -> None:
    src = tmp_path / "seed"
    src.mkdir()
    (src / "a.txt").write_text("seeded")
    res = run_ckpt(["push", str(src), str(remote)], cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    "who",
    ["a lease that says ttl Infinity", "another machine with this host's name"],
)
def test_a_live_lease_of_an_odd_kind_is_not_taken_at_once(
    tmp_path: Path, remote: Path, who: str
) -> None:
    """Injected: a live (beating) lease written with "ttl": Infinity, as
    `--lease-timeout inf` wrote it before; or by a machine of this host's
    name with another boot id (which is not a reboot of this one). Asserted:
    a run is refused (69) and writes no snapshot; the lease is untouched."""
    _seed(tmp_path, remote)
    if who.startswith("another machine"):
        assert boot_id(), "no /proc/sys/kernel/random/boot_id"
        fields: dict[str, Any] = {"host": host_name(), "pid": os.getpid()}
    else:
        fields = {"ttl": float("inf")}
    before = _snapshot_keys(remote)
    with _foreign(remote / "lease.json", **fields) as lease:
        res, report = _contend(tmp_path, remote, "--lease-timeout", "5")
        lease.write()  # one more beat: it sees whether its lease was overwritten
        assert not lease.overwritten, f"the live lease was overwritten:\n{res.stderr}"
        _assert_refused(res, report, lease.doc)
        assert _lease(remote)["owner"] == lease.doc["owner"]
    assert _snapshot_keys(remote) == before
    record(KIND, 1, injected=who)


def test_gc_whose_clock_is_ahead_does_not_collect_under_a_live_rank(
    tmp_path: Path, remote: Path
) -> None:
    """Injected: a multi-node remote (rank 0 wrote snapshots) whose rank 1
    holds a beating lease; `ckpt gc --keep 1` runs with its clock 5 minutes
    ahead (the rank's lease looks 300 s old to it). Asserted: gc is refused
    (69) naming rank 1, and deletes nothing."""
    faketime = _faketime()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    for text in ("one", "two"):
        res = run_ckpt(
            [
                *_run_args(tmp_path / "r0", remote, "--rank", "0", "--world-size", "2"),
                "--",
                PY,
                str(script),
                str(tmp_path / f"r0-{text}.txt"),
                text,
            ],
            cwd=tmp_path,
            timeout=90,
        )
        assert res.returncode == 0, res.stderr
    before = read_tree(remote)
    with _foreign(remote / "ranks" / "1" / "lease.json", ttl=60.0) as lease:
        res = subprocess.run(
            [faketime, "-f", "+5m", str(CKPT), "gc", str(remote), "--keep", "1"],
            cwd=tmp_path,
            env=dict(os.environ),
            text=True,
            capture_output=True,
            timeout=150,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        lease.write()
    assert not lease.overwritten
    assert res.returncode == 69, res.stderr
    (line,) = error_lines(res.stderr)
    assert "ranks 1" in line, line
    after = {k: v for k, v in read_tree(remote).items() if not k.startswith("ranks/1/")}
    assert after == {k: v for k, v in before.items() if not k.startswith("ranks/1/")}
    record(KIND, 1, injected="gc clock 5 min ahead, multi-node")


@pytest.mark.parametrize("field", ["pid", "heartbeat"])
def test_a_lease_with_an_absurd_number_is_judged_not_crashed_on(
    tmp_path: Path, remote: Path, field: str
) -> None:
    """Injected: a lease of this host and boot whose pid, or heartbeat time,
    is an integer too large for os.kill and a float. Asserted: no crash (70):
    a fresh lease naming an impossible pid is refused (69); an unreadable
    heartbeat makes the lease garbage, taken over."""
    _seed(tmp_path, remote)
    doc = {
        "owner": "run-crafted",
        "host": host_name(),
        "boot": boot_id(),
        "pid": os.getpid(),
        "heartbeat": time.time(),
        "ttl": 60.0,
        field: 10**30 if field == "pid" else 10**400,  # too large for a C long, a float
    }
    (remote / "lease.json").write_text(json.dumps(doc))
    res, report = _contend(tmp_path, remote)
    assert "unexpected error" not in res.stderr, res.stderr
    if field == "pid":
        _assert_refused(res, report, doc)
    else:
        assert res.returncode == 0, res.stderr
        assert "took over the lease" in res.stderr and "unreadable" in res.stderr, res.stderr
    record(KIND, 1, injected=f"absurd {field}")
