"""Children that do not stop on SIGTERM: `ckpt` forwards the stop, SIGKILLs
what is left after --grace, still flushes the final state, exits 143, and
leaves no process behind.

(tests/integration/test_signals.py covers a single child that catches SIGTERM
and carries on. These are harder: a whole process tree that ignores SIGTERM,
including a grandchild in a session of its own that keeps writing to the
checkpoint directory during the grace period; and a child whose SIGTERM handler
can never run because it is stuck in one long C call, with a grandchild that
is stopped (SIGSTOP) and so cannot act on SIGTERM either.)
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from faults._proc import read_announce, wait_gone
from faults._tally import record
from integration._util import PY, Running, read_tree, restore_into, wait_for

pytestmark = pytest.mark.timeout(120)

#: argv: ckpt dir, name. Ignores SIGTERM; writes <name>.txt (a counter) every
#: 20 ms, atomically, for ever.
COUNTER = """
import os, signal, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, signal.SIG_IGN)
d, name = Path(sys.argv[1]), sys.argv[2]
n = 0
while True:
    n += 1
    tmp = d / (name + ".txt.tmp")
    tmp.write_text(str(n))
    os.replace(tmp, d / (name + ".txt"))
    time.sleep(0.02)
"""

#: argv: ready file, counter source. The whole tree ignores SIGTERM: the child,
#: a grandchild in its group and one in its own session (setsid), all writing
#: counters. Announces every pid once each counter has been written.
IGNORING_TREE = """
import json, os, signal, subprocess, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, signal.SIG_IGN)
d = Path(os.environ["CKPT_DIR"])
ready, counter = Path(sys.argv[1]), sys.argv[2]
(d / "state.txt").write_text("written before the stop")
same_group = subprocess.Popen([sys.executable, "-c", counter, str(d), "grandchild"])
own_session = subprocess.Popen(
    [sys.executable, "-c", counter, str(d), "daemon"], start_new_session=True
)
while not ((d / "grandchild.txt").exists() and (d / "daemon.txt").exists()):
    time.sleep(0.01)
part = ready.with_name(ready.name + ".part")
pids = {"child": os.getpid(), "grandchild": same_group.pid, "daemon": own_session.pid}
part.write_text(json.dumps(pids))
os.replace(part, ready)
n = 0
while True:
    n += 1
    tmp = d / "child.txt.tmp"
    tmp.write_text(str(n))
    os.replace(tmp, d / "child.txt")
    time.sleep(0.02)
"""

#: argv: ready file. A SIGTERM handler that would save and exit, which never
#: runs: the child is stuck in one C call (no bytecode boundary for Python to
#: run handlers at). Its grandchild writes a file, then stops itself (SIGSTOP).
STUCK = """
import json, os, signal, subprocess, sys, time
from pathlib import Path
d = Path(os.environ["CKPT_DIR"])
ready = Path(sys.argv[1])

def on_term(signum, frame):
    (d / "handled.txt").write_text("the handler ran")
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
(d / "state.txt").write_text("written before the stop")
stopped = subprocess.Popen([sys.executable, "-c", (
    "import os, signal, sys; from pathlib import Path; "
    "(Path(sys.argv[1]) / 'grandchild.txt').write_text('then stopped'); "
    "os.kill(os.getpid(), signal.SIGSTOP)"
), str(d)])

def state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]

while state(stopped.pid) != "T":
    time.sleep(0.01)
part = ready.with_name(ready.name + ".part")
part.write_text(json.dumps({"child": os.getpid(), "stopped": stopped.pid}))
os.replace(part, ready)
cpu = ready.with_name("cpu.part")
cpu.write_text(str(time.process_time()))
os.replace(cpu, ready.with_name("cpu-at-announce"))
sum(range(10**15))  # hours of C: SIGTERM's Python handler cannot run
"""


def _counters(ckpt_dir: Path) -> dict[str, int]:
    return {
        name: int((ckpt_dir / f"{name}.txt").read_text())
        for name in ("child", "grandchild", "daemon")
        if (ckpt_dir / f"{name}.txt").exists()
    }


def test_a_tree_that_ignores_sigterm_is_killed_after_grace_and_its_last_state_flushed(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    """Injected: SIGTERM to ckpt while the child, a grandchild in its group and
    a grandchild in its own session all ignore SIGTERM and keep writing.
    Asserted: they go on writing through --grace (the stop really was
    ignored), then all three are gone; exit 143; the remote holds exactly the
    directory's final state (so the final snapshot came after the last of
    them died, the session leader included)."""
    script = tmp_path / "tree.py"
    script.write_text(IGNORING_TREE)
    ready = tmp_path / "ready.json"
    ckpt = spawn(
        [
            "run",
            "--dir",
            str(ckpt_dir),
            "--remote",
            str(remote),
            "--grace",
            "1",
            "--",
            PY,
            str(script),
            str(ready),
            COUNTER,
        ]
    )
    pids: dict[str, int] = read_announce(ready, what="the child tree to start", proc=ckpt)
    ckpt.extra_pids.extend(pids.values())
    at_stop = _counters(ckpt_dir)

    ckpt.signal(signal.SIGTERM)

    assert ckpt.wait(timeout=60) == 143, ckpt.stderr()
    wait_gone(list(pids.values()), what="the child tree")
    stderr = ckpt.stderr()
    assert "SIGKILL" in stderr and "final state is durable" in stderr, stderr
    final = _counters(ckpt_dir)
    assert all(final[k] > at_stop[k] for k in pids), (
        f"a process stopped writing on SIGTERM: {at_stop} -> {final} (the fault was not injected)"
    )
    out = tmp_path / "restored"
    restore_into(remote, out, cwd=tmp_path)
    local = {k: v for k, v in read_tree(ckpt_dir).items() if not k.endswith(".tmp")}
    assert read_tree(out) == local, (
        "the final snapshot is not the directory's final state: "
        f"remote {read_tree(out)} vs local {local}"
    )
    assert read_tree(out)["state.txt"] == b"written before the stop"
    record("child ignores SIGTERM (whole tree, one in its own session)", 1)


def test_a_child_stuck_in_c_with_a_stopped_grandchild_is_killed_and_its_state_flushed(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    """Injected: SIGTERM to ckpt while the child is stuck in one long C call
    (its SIGTERM handler cannot run) and its grandchild is stopped (SIGSTOP).
    Asserted: the handler never ran (the child really was stuck), both are
    killed after --grace, exit 143, and what they wrote before is restored."""
    script = tmp_path / "stuck.py"
    script.write_text(STUCK)
    ready = tmp_path / "ready.json"
    ckpt = spawn(
        [
            "run",
            "--dir",
            str(ckpt_dir),
            "--remote",
            str(remote),
            "--grace",
            "1",
            "--",
            PY,
            str(script),
            str(ready),
        ]
    )
    pids: dict[str, int] = read_announce(ready, what="the child to get stuck", proc=ckpt)
    ckpt.extra_pids.extend(pids.values())
    cpu_file = tmp_path / "cpu-at-announce"
    wait_for(cpu_file.exists, what="the child to enter the C call", proc=ckpt)
    # 0.2 s of CPU more than at the last Python line: it is inside sum() now.
    spinning_from = float(cpu_file.read_text()) + 0.2
    wait_for(
        lambda: _cpu_seconds(pids["child"]) > spinning_from, what="the child to spin", proc=ckpt
    )

    ckpt.signal(signal.SIGTERM)

    assert ckpt.wait(timeout=60) == 143, ckpt.stderr()
    wait_gone(list(pids.values()), what="the stuck child and its stopped grandchild")
    stderr = ckpt.stderr()
    assert "SIGKILL" in stderr and "final state is durable" in stderr, stderr
    assert not (ckpt_dir / "handled.txt").exists(), "the child was not stuck: its handler ran"
    out = tmp_path / "restored"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {
        "state.txt": b"written before the stop",
        "grandchild.txt": b"then stopped",
    }
    record("child ignores SIGTERM (stuck in C, grandchild stopped)", 1)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
