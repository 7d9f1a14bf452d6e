"""Real signals: SIGTERM/SIGINT to the supervisor, the --grace SIGKILL, and
kill -9 of the supervisor itself (no orphans, a repository that restores)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt_cli.run.signals import ECHO_WINDOW

from ._util import (
    Running,
    has_snapshot_with,
    pid_gone,
    read_tree,
    restore_into,
    run_args,
    script,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

#: Saves state, installs signal handlers (argv[2] = "save-exit": on SIGTERM
#: write final.txt and exit 0; "slow-save-exit": the same after a second of
#: work; "save-ignore": on SIGTERM write term-seen.txt and
#: carry on; "record-exit": on SIGTERM/SIGINT/SIGHUP write got-<NAME>.txt and
#: exit 0), then announces itself in argv[1] (outside the checkpoint dir) and waits.
WAITER = """
    import json, os, signal, sys, time
    from pathlib import Path
    d = Path(os.environ["CKPT_DIR"])
    ready, mode = Path(sys.argv[1]), sys.argv[2]

    def save(name, text):
        tmp = d / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, d / name)

    def on_term(signum, frame):
        if mode == "slow-save-exit":
            time.sleep(1)
        if mode in ("save-exit", "slow-save-exit"):
            save("final.txt", "saved on SIGTERM")
            sys.exit(0)
        save("term-seen.txt", "SIGTERM ignored")

    def record(signum, frame):
        save(f"got-{signal.Signals(signum).name}.txt", "forwarded")
        sys.exit(0)

    if mode == "record-exit":
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, record)
    else:
        signal.signal(signal.SIGTERM, on_term)
    save("state.txt", "running")
    tmp = ready.with_name(ready.name + ".part")
    tmp.write_text(json.dumps({"pid": os.getpid()}))
    os.replace(tmp, ready)
    while True:
        time.sleep(0.05)
"""


def _start_waiter(
    spawn: Callable[..., Running],
    tmp_path: Path,
    ckpt_dir: Path,
    remote: Path,
    mode: str,
    *extra: str,
    prefix: list[str] | None = None,
) -> tuple[Running, int]:
    ready = tmp_path / "ready.json"
    cmd = [*script(tmp_path, "waiter.py", WAITER), str(ready), mode]
    ckpt = spawn([*run_args(ckpt_dir, remote, *extra), *cmd], prefix=prefix)
    wait_for(ready.exists, what="the child to start", proc=ckpt)
    pid = json.loads(ready.read_text())["pid"]
    ckpt.extra_pids.append(pid)
    return ckpt, pid


def test_sigterm_lets_the_child_save_and_the_save_reaches_the_remote(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    ckpt, child = _start_waiter(spawn, tmp_path, ckpt_dir, remote, "save-exit")

    ckpt.signal(signal.SIGTERM)

    assert ckpt.wait() == 143, ckpt.stderr()
    assert pid_gone(child)
    assert "final state is durable" in ckpt.stderr()
    out = tmp_path / "fresh"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {"state.txt": b"running", "final.txt": b"saved on SIGTERM"}


def test_child_ignoring_sigterm_is_killed_after_grace_and_state_still_flushed(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    ckpt, child = _start_waiter(spawn, tmp_path, ckpt_dir, remote, "save-ignore", "--grace", "1")

    ckpt.signal(signal.SIGTERM)

    assert ckpt.wait() == 143, ckpt.stderr()
    assert pid_gone(child), "the child must be SIGKILLed once --grace is over"
    stderr = ckpt.stderr()
    assert "SIGKILL" in stderr and "final state is durable" in stderr, stderr
    out = tmp_path / "fresh"
    restore_into(remote, out, cwd=tmp_path)
    # term-seen.txt was written after the signal: the final flush came after it.
    assert read_tree(out) == {"state.txt": b"running", "term-seen.txt": b"SIGTERM ignored"}


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM], ids=lambda s: signal.Signals(s).name
)
def test_stop_signal_to_the_supervisor_exits_128_plus_n(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path, sig: signal.Signals
) -> None:
    # A grace longer than the wait below: the child must exit on the forwarded signal.
    ckpt, child = _start_waiter(spawn, tmp_path, ckpt_dir, remote, "record-exit", "--grace", "600")

    ckpt.signal(sig)

    assert ckpt.wait(timeout=60) == 128 + sig, ckpt.stderr()
    assert pid_gone(child)
    assert "attempt 2" not in ckpt.stderr(), "a stopped supervisor does not relaunch"
    out = tmp_path / "fresh"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {"state.txt": b"running", f"got-{sig.name}.txt": b"forwarded"}


def test_second_sigterm_kills_the_child_without_waiting_for_grace(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    # --grace is far longer than the wait below: only the escalation can end it.
    ckpt, child = _start_waiter(spawn, tmp_path, ckpt_dir, remote, "save-ignore", "--grace", "3600")
    ckpt.signal(signal.SIGTERM)
    sent = time.monotonic()
    wait_for((ckpt_dir / "term-seen.txt").exists, what="the child to see SIGTERM", proc=ckpt)
    # Closer to the first than ECHO_WINDOW it would count as the same stop, twice.
    time.sleep(max(0.0, sent + ECHO_WINDOW + 0.1 - time.monotonic()))

    ckpt.signal(signal.SIGTERM)

    assert ckpt.wait(timeout=60) == 143, ckpt.stderr()
    assert pid_gone(child)
    out = tmp_path / "fresh"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {"state.txt": b"running", "term-seen.txt": b"SIGTERM ignored"}


def test_one_stop_delivered_twice_still_gets_the_grace_period(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    """GNU timeout (without --foreground) sends its signal to ckpt and then to
    its own process group, ckpt included: the same stop, twice, at once. That
    is not a second stop: the child still gets --grace and its save is flushed."""
    ckpt, _child = _start_waiter(
        spawn, tmp_path, ckpt_dir, remote, "slow-save-exit", "--grace", "600", prefix=["setsid"]
    )
    assert os.getpgid(ckpt.pid) == ckpt.pid, "setsid did not give ckpt its own group"

    os.kill(ckpt.pid, signal.SIGTERM)
    os.killpg(ckpt.pid, signal.SIGTERM)

    assert ckpt.wait(timeout=60) == 143, ckpt.stderr()
    assert "killing the child now" not in ckpt.stderr()
    out = tmp_path / "fresh"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out)["final.txt"] == b"saved on SIGTERM"


def test_a_stop_whose_final_snapshot_cannot_be_made_durable_exits_69(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    """143 tells a wrapper "stopped, and the state is safe": when the final
    flush fails it must not say that. The local directory keeps the state."""
    ckpt, _child = _start_waiter(
        spawn, tmp_path, ckpt_dir, remote, "save-exit", "--flush-timeout", "2"
    )
    wait_for(lambda: has_snapshot_with(remote, "state.txt"), what="a first snapshot", proc=ckpt)
    remote.rename(tmp_path / "remote.gone")
    remote.write_text("the remote is gone: a file stands in its place")

    ckpt.signal(signal.SIGTERM)

    assert ckpt.wait(timeout=90) == 69, ckpt.stderr()
    assert "stopped by SIGTERM, but the final state is not durable" in ckpt.stderr()
    assert (ckpt_dir / "final.txt").read_text() == "saved on SIGTERM"


#: Counts its launches in argv[1] and asks for a retry every time.
RETRY_ME = """
    import sys
    with open(sys.argv[1], "a") as f:
        f.write("launch\\n")
    sys.exit(75)
"""


def test_sigterm_while_backing_off_stops_without_relaunch(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    launches = tmp_path / "launches.log"
    cmd = [*script(tmp_path, "retry_me.py", RETRY_ME), str(launches)]
    # The first backoff lasts 50-100 s; a relaunch would show in the launch log.
    ckpt = spawn([*run_args(ckpt_dir, remote, "--retries", "3", backoff="100:100"), *cmd])
    wait_for(lambda: "retry 1/3" in ckpt.stderr(), what="ckpt to start backing off", proc=ckpt)

    ckpt.signal(signal.SIGTERM)

    assert ckpt.wait(timeout=45) == 143, ckpt.stderr()
    assert launches.read_text().split() == ["launch"]


#: Exits 0 on SIGUSR1 after noting it in argv[2]; announces itself in argv[1].
USR1 = """
    import json, os, signal, sys, time
    from pathlib import Path
    ready, seen = Path(sys.argv[1]), Path(sys.argv[2])

    def on_usr1(signum, frame):
        seen.write_text("SIGUSR1")
        sys.exit(0)

    signal.signal(signal.SIGUSR1, on_usr1)
    part = ready.with_name(ready.name + ".part")
    part.write_text(json.dumps({"pid": os.getpid()}))
    os.replace(part, ready)
    while True:
        time.sleep(0.05)
"""


def test_sigusr1_is_forwarded_to_the_child(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    ready, seen = tmp_path / "ready.json", tmp_path / "seen.txt"
    ckpt = spawn(
        [*run_args(ckpt_dir, remote), *script(tmp_path, "usr1.py", USR1), str(ready), str(seen)]
    )
    wait_for(ready.exists, what="the child to start", proc=ckpt)
    ckpt.extra_pids.append(json.loads(ready.read_text())["pid"])

    ckpt.signal(signal.SIGUSR1)

    assert ckpt.wait() == 0, ckpt.stderr()
    assert seen.read_text() == "SIGUSR1"


# ---------------------------------------------------------------- 9. kill -9 of ckpt

#: Starts a grandchild, saves state, writes both pids to argv[1], then waits.
PARENT = """
    import json, os, subprocess, sys, time
    from pathlib import Path
    d = Path(os.environ["CKPT_DIR"])
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
    tmp = d / "state.txt.tmp"
    tmp.write_text("state before the crash")
    os.replace(tmp, d / "state.txt")
    pids = Path(sys.argv[1])
    part = pids.with_name(pids.name + ".part")
    part.write_text(json.dumps({"child": os.getpid(), "grandchild": grandchild.pid}))
    os.replace(part, pids)
    while True:
        time.sleep(0.05)
"""


def test_sigkill_of_the_supervisor_leaves_no_orphans_and_a_restorable_remote(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    pids_file = tmp_path / "pids.json"
    cmd = [*script(tmp_path, "parent.py", PARENT), str(pids_file)]
    ckpt = spawn([*run_args(ckpt_dir, remote), *cmd])
    wait_for(pids_file.exists, what="the child to start its grandchild", proc=ckpt)
    pids = json.loads(pids_file.read_text())
    ckpt.extra_pids += [pids["child"], pids["grandchild"]]
    assert not pid_gone(pids["child"]) and not pid_gone(pids["grandchild"])
    wait_for(
        lambda: has_snapshot_with(remote, "state.txt"), what="a snapshot of state.txt", proc=ckpt
    )

    ckpt.signal(signal.SIGKILL)
    assert ckpt.wait() == -signal.SIGKILL

    wait_for(lambda: pid_gone(pids["child"]), what=f"child {pids['child']} to be gone")
    wait_for(
        lambda: pid_gone(pids["grandchild"]), what=f"grandchild {pids['grandchild']} to be gone"
    )
    out = tmp_path / "fresh"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {"state.txt": b"state before the crash"}
