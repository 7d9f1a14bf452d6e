"""The shell shim (shims/ckpt/ckpt.sh) and the bash example, under the real `ckpt run`
and outside it; `ckpt commit` from a bash child and without a supervisor."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

import ckpt

from ._util import (
    PY,
    Running,
    entry,
    error_lines,
    ls_json,
    manifests,
    newest_manifest,
    read_tree,
    restore_into,
    run_args,
    run_ckpt,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
#: The shim of this checkout: inside the package once it ships in the wheel.
SHIM = next(
    (p for p in (REPO / "shims" / "ckpt" / "ckpt.sh", REPO / "shims" / "ckpt.sh") if p.exists()),
    REPO / "shims" / "ckpt.sh",
)
EXAMPLE = REPO / "examples" / "bash" / "train.sh"
OUTSIDE = "not running under `ckpt run`"

#: In front of every bash child: strict mode, the shim, and emit KEY VALUE...,
#: which appends a line "KEY VALUE..." to $1 (a log outside the checkpoint dir).
BASH_PRELUDE = """\
set -euo pipefail
LOG=$1
emit() { printf '%s\\n' "$*" >>"$LOG"; }
"""


def _bash_child(tmp_path: Path, name: str, body: str, *, shim: bool = True) -> list[str]:
    d = tmp_path / "scripts"
    d.mkdir(exist_ok=True)
    source = f"source {shlex.quote(str(SHIM))}\n" if shim else ""
    path = d / name
    path.write_text(BASH_PRELUDE + source + textwrap.dedent(body))
    return ["bash", str(path), str(tmp_path / "child.log")]


def _log(tmp_path: Path) -> list[str]:
    p = tmp_path / "child.log"
    return p.read_text().splitlines() if p.exists() else []


def _logged(tmp_path: Path, key: str) -> Callable[[], str | None]:
    """A predicate for wait_for: the value of the first line starting with key."""

    def find() -> str | None:
        for line in _log(tmp_path):
            k, _, value = line.partition(" ")
            if k == key:
                return value
        return None

    return find


def _await_logged(tmp_path: Path, key: str, ckpt: Running, what: str) -> str:
    found = wait_for(_logged(tmp_path, key), what=what, proc=ckpt)
    assert found is not None
    return found


def _bash(
    script: str, *, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """bash -c 'strict mode; source the shim; script' outside any supervisor."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_")}
    full.update(env or {})
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail\nsource {shlex.quote(str(SHIM))}\n{script}"],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# ---------------------------------------------------------------- the bash example


def _steps(stdout: str) -> list[int]:
    return [int(m) for m in re.findall(r"^step (\d+): total", stdout, re.MULTILINE)]


def test_bash_example_interrupted_and_resumed_matches_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    env = {"TRAIN_DELAY": "0.01"}
    interrupted = run_ckpt(
        [*run_args(tmp_path / "ck1", tmp_path / "remote1", "--keep", "100"), "bash", str(EXAMPLE)],
        cwd=tmp_path,
        env=env,
    )
    straight = run_ckpt(
        [*run_args(tmp_path / "ck2", tmp_path / "remote2"), "bash", str(EXAMPLE)],
        cwd=tmp_path,
        env={**env, "TRAIN_FAIL_AT": "0"},
    )

    assert interrupted.returncode == 0, interrupted.stderr
    assert straight.returncode == 0, straight.stderr
    assert "attempt 1: exit code 75" in interrupted.stderr
    assert "step 6: simulated spot-instance hiccup" in interrupted.stderr
    assert "attempt 1: starting at step 1 (restored snapshot: none)" in interrupted.stdout
    resumed = re.search(
        r"^attempt 2: starting at step 6 \(restored snapshot: (\w+)\)$",
        interrupted.stdout,
        re.MULTILINE,
    )
    assert resumed, interrupted.stdout
    assert resumed.group(1) in {
        s["id"] for s in ls_json(tmp_path / "remote1", cwd=tmp_path)["snapshots"]
    }
    assert "attempt 2" not in straight.stderr
    # Every step ran exactly once, and the result is the uninterrupted one.
    assert _steps(interrupted.stdout) == list(range(1, 11))
    assert _steps(straight.stdout) == list(range(1, 11))
    last = interrupted.stdout.strip().splitlines()[-1]
    assert last == "done: 10 steps, total 385"
    assert straight.stdout.strip().splitlines()[-1] == last
    # The same state, in the directory and in each remote.
    final = {"payload": b"10 385\n", "model.txt": b"weights after step 9: 285\n"}
    for n in (1, 2):
        assert read_tree(tmp_path / f"ck{n}") == final
        restore_into(tmp_path / f"remote{n}", tmp_path / f"fresh{n}", cwd=tmp_path)
        assert read_tree(tmp_path / f"fresh{n}") == final


def test_bash_example_runs_bare_with_one_warning(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_")}
    env.update(TRAIN_DELAY="0", TRAIN_FAIL_AT="0", TRAIN_STEPS="4")
    # A user who runs the script bare has `ckpt` installed on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    res = subprocess.run(
        ["bash", str(EXAMPLE)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "done: 4 steps, total 30"
    warnings = [line for line in res.stderr.splitlines() if OUTSIDE in line]
    assert len(warnings) == 1, res.stderr
    assert read_tree(tmp_path / "checkpoints") == {
        "payload": b"4 30\n",
        "model.txt": b"weights after step 3: 14\n",
    }


# ---------------------------------------------------------------- the functions, supervised

FUNCTIONS = r"""
attempt=$(ckpt_attempt)
emit attempt "$attempt"
emit dir "$(ckpt_dir)"
if id=$(ckpt_restored); then emit restored "$id"; else emit restored none; fi
if ckpt_prev_exists; then emit prev yes; else emit prev no; fi
if [[ $attempt == 1 ]]; then
    if ckpt_read >/dev/null; then emit read1 yes; else emit read1 "none $?"; fi
    printf 'state of attempt 1\n' | ckpt_write
    emit read2 "$(ckpt_read)"
    printf 'weights' >"$SRC/model.src"
    ckpt_save "$SRC/model.src" model.bin
    ckpt_save "$SRC/model.src" sub/copy.bin
    ckpt_save "$SRC/model.src"
    ckpt_commit --no-wait
    ckpt_retry "attempt 1 asks for a retry"
fi
emit read "$(ckpt_read)"
emit python "$("$PY" -c 'import ckpt; print(ckpt.checkpoint().read().decode().strip())')"
"$PY" -c 'import ckpt; ckpt.checkpoint().write(b"written by python\n")'
emit bash "$(ckpt_read)"
printf 'state of attempt 2\n' | ckpt_write
emit leftovers "$(cd "$(ckpt_dir)" && find . -name '*.tmp' | wc -l)"
"""


def test_shell_functions_under_the_supervisor_resume_after_ckpt_retry(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    cmd = _bash_child(tmp_path, "functions.sh", FUNCTIONS)

    res = run_ckpt(
        [*run_args(ckpt_dir, remote, "--keep", "50"), *cmd],
        cwd=tmp_path,
        env={"SRC": str(src), "PY": PY},
    )

    assert res.returncode == 0, res.stderr
    assert "attempt 1 asks for a retry" in res.stderr
    assert "attempt 1: exit code 75" in res.stderr
    assert OUTSIDE not in res.stderr
    log = [line.split(" ", 1) for line in _log(tmp_path)]
    got: dict[str, list[str]] = {}
    for key, value in log:
        got.setdefault(key, []).append(value)
    assert got["attempt"] == ["1", "2"]
    assert got["dir"] == [str(ckpt_dir), str(ckpt_dir)]
    listed = {s["id"] for s in ls_json(remote, cwd=tmp_path)["snapshots"]}
    assert got["restored"][0] == "none"
    assert got["restored"][1] in listed
    assert got["prev"] == ["no", "yes"]
    assert got["read1"] == ["none 1"]
    assert got["read2"] == ["state of attempt 1"]
    assert got["read"] == ["state of attempt 1"], "attempt 2 reads what attempt 1 wrote"
    assert got["python"] == ["state of attempt 1"], "the same payload as ckpt.checkpoint().read()"
    assert got["bash"] == ["written by python"]
    assert got["leftovers"] == ["0"]
    fresh = tmp_path / "fresh"
    restore_into(remote, fresh, cwd=tmp_path)
    assert read_tree(fresh) == {
        "payload": b"state of attempt 2\n",
        "model.bin": b"weights",
        "model.src": b"weights",
        "sub/copy.bin": b"weights",
    }
    # ckpt_write and ckpt_save commit: each state attempt 1 saved is a snapshot.
    states = [{e["path"] for e in m["entries"]} for m in manifests(remote) if m["attempt"] == 1]
    assert states == [
        {"payload"},
        {"payload", "model.bin"},
        {"payload", "model.bin", "sub", "sub/copy.bin"},
        {"payload", "model.bin", "sub", "sub/copy.bin", "model.src"},
    ]


# ---------------------------------------------------------------- the checkpoint signal

PREEMPTIBLE = r"""
ckpt_on_preemption 'emit callback ran'
emit ready "$CKPT_SOCKET $$ ${CKPT_CHECKPOINT_SIGNAL:-}"
until ckpt_preemption_requested; do
    sleep 0.05
done
printf 'saved on preemption\n' | ckpt_write
emit saved yes
"""


@pytest.mark.parametrize("sig", ["default", "SIGUSR2"])
def test_ckpt_signal_reaches_a_bash_script_that_sourced_the_shim(
    spawn: Callable[..., Running], tmp_path: Path, remote: Path, ckpt_dir: Path, sig: str
) -> None:
    extra = [] if sig == "default" else ["--checkpoint-signal", sig]
    # A trap set before the shim is sourced still runs.
    body = (
        'trap "emit previous trap" "${CKPT_CHECKPOINT_SIGNAL#SIG}"\n'
        + f"source {shlex.quote(str(SHIM))}\n"
    )
    cmd = _bash_child(tmp_path, "preemptible.sh", body + PREEMPTIBLE, shim=False)
    ckpt = spawn([*run_args(ckpt_dir, remote, *extra), *cmd])
    socket, pid, signame = _await_logged(tmp_path, "ready", ckpt, "the script to start").split()
    ckpt.extra_pids.append(int(pid))
    assert signame == ("SIGUSR1" if sig == "default" else sig)

    sent = run_ckpt(["signal", "--socket", socket], cwd=tmp_path, timeout=60)

    assert sent.returncode == 0, sent.stderr
    assert f"checkpoint signal sent to pid {pid}\n" in sent.stderr
    assert ckpt.wait() == 0, ckpt.stderr()
    assert _log(tmp_path)[1:] == ["callback ran", "previous trap", "saved yes"]
    fresh = tmp_path / "fresh"
    restore_into(remote, fresh, cwd=tmp_path)
    assert read_tree(fresh) == {"payload": b"saved on preemption\n"}


WRAPPER = r"""
"$PY" -c 'import ckpt; ckpt.checkpoint().write(b"from a python step")'
emit ready "$CKPT_SOCKET $$"
until ckpt_preemption_requested; do
    sleep 0.05
done
emit preempted yes
"""


def test_ckpt_signal_still_reaches_the_bash_script_after_a_python_step_exited(
    spawn: Callable[..., Running], tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    """A bash wrapper (registered by the shim) runs a Python step that imports
    ckpt (and registers itself) and exits. The wrapper still handles the signal:
    `ckpt signal` must reach it, not fail on the step's dead pid."""
    cmd = _bash_child(tmp_path, "wrapper.sh", WRAPPER)
    ckpt = spawn([*run_args(ckpt_dir, remote), *cmd], env={"PY": PY})
    socket, pid = _await_logged(tmp_path, "ready", ckpt, "the script to start").split()
    ckpt.extra_pids.append(int(pid))

    sent = run_ckpt(["signal", "--socket", socket], cwd=tmp_path, timeout=60)

    assert sent.returncode == 0, sent.stderr
    assert f"checkpoint signal sent to pid {pid}\n" in sent.stderr
    assert ckpt.wait() == 0, ckpt.stderr()
    assert _logged(tmp_path, "preempted")() == "yes"


#: The script waits in a foreground command that has no handler of its own.
FOREGROUND = r"""
emit script "$$"
"$PY" -c 'import os, sys, time
with open(sys.argv[2], "a") as f:
    f.write(f"ready {os.getpid()}\n")
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)' "$GATE" "$LOG"
emit helper done
if ckpt_preemption_requested; then emit preempted yes; else emit preempted no; fi
"""


def test_checkpoint_signal_sent_to_ckpt_itself_reaches_only_the_registered_script(
    spawn: Callable[..., Running], tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    """`kill -USR1 <ckpt>` (a scheduler's preemption notice) must be handled like
    `ckpt signal`: delivered to the processes that registered a handler, not to
    the whole group, where it kills every process without one (here the
    script's foreground command, which fails the run)."""
    gate = tmp_path / "gate"
    cmd = _bash_child(tmp_path, "foreground.sh", FOREGROUND)
    ckpt = spawn([*run_args(ckpt_dir, remote), *cmd], env={"PY": PY, "GATE": str(gate)})
    helper = _await_logged(tmp_path, "ready", ckpt, "the foreground command to start")
    ckpt.extra_pids += [int(helper), int(_log(tmp_path)[0].split()[1])]

    ckpt.signal(signal.SIGUSR1)

    try:  # let the supervisor handle it; the run must not end meanwhile
        status = ckpt.proc.wait(2.0)
    except subprocess.TimeoutExpired:
        status = None
    assert status is None, (
        f"ckpt exited {status} after SIGUSR1: the script's foreground command was killed\n"
        f"{ckpt.stderr()}"
    )
    gate.touch()
    assert ckpt.wait() == 0, ckpt.stderr()
    assert _log(tmp_path)[2:] == ["helper done", "preempted yes"]


# ---------------------------------------------------------------- finding the shim

FINDS_SHIM = r"""
shim=$("$CKPT_BIN" shell-shim --path)
emit path "$shim"
source "$shim"
printf 'found\n' | ckpt_write
emit read "$(ckpt_read)"
"""


def test_a_bash_child_finds_the_shim_through_the_supervisors_ckpt(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    """`source "$("$CKPT_BIN" shell-shim --path)"`: the installed shim is this one."""
    cmd = _bash_child(tmp_path, "finds_shim.sh", FINDS_SHIM, shim=False)

    res = run_ckpt([*run_args(ckpt_dir, remote), *cmd], cwd=tmp_path)

    path = _logged(tmp_path, "path")()
    assert path is not None, res.stderr
    assert Path(path).is_file(), f"`ckpt shell-shim --path` names {path}, which does not exist"
    assert Path(path).read_bytes() == SHIM.read_bytes()
    assert res.returncode == 0, res.stderr
    assert _logged(tmp_path, "read")() == "found"
    fresh = tmp_path / "fresh"
    restore_into(remote, fresh, cwd=tmp_path)
    assert read_tree(fresh) == {"payload": b"found\n"}


# ---------------------------------------------------------------- ckpt commit from bash

COMMITTER = r"""
d=$CKPT_DIR
printf 'committed\n' >"$d/state.txt"
status=0
"$CKPT_BIN" commit 2>"$d/../commit.err" || status=$?
emit status "$status"
printf 'pinned\n' >"$d/pinned.txt"
"$CKPT_BIN" commit --no-wait 2>>"$d/../commit.err"
printf 'after the last commit\n' >"$d/late.txt"
"""


def test_ckpt_commit_from_a_bash_child(tmp_path: Path, remote: Path, ckpt_dir: Path) -> None:
    cmd = _bash_child(tmp_path, "committer.sh", COMMITTER, shim=False)

    res = run_ckpt([*run_args(ckpt_dir, remote, "--keep", "20"), *cmd], cwd=tmp_path)

    assert res.returncode == 0, res.stderr
    assert _logged(tmp_path, "status")() == "0"
    said = (tmp_path / "commit.err").read_text()
    committed = re.search(r"committed: snapshot (\w+) is durable", said)
    assert committed, said
    assert "pinned" in said
    by_id = {m["id"]: m for m in manifests(remote)}
    first = by_id[committed.group(1)]
    assert entry(first, "state.txt") is not None and entry(first, "pinned.txt") is None
    newest = newest_manifest(remote)
    assert {e["path"] for e in newest["entries"]} == {"state.txt", "pinned.txt"}
    assert (ckpt_dir / "late.txt").exists(), "written after the last commit: not snapshotted"


BREAKS_REMOTE = r"""
rm -rf "$REMOTE/snapshots"
printf 'not a directory any more' >"$REMOTE/snapshots"
status=0
printf 'cannot be made durable\n' | ckpt_write 2>"$LOG.err" || status=$?
emit status "$status"
emit read "$(ckpt_read)"
"""


def test_ckpt_write_reports_a_commit_that_cannot_be_made_durable(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd = _bash_child(tmp_path, "breaks_remote.sh", BREAKS_REMOTE)

    run_ckpt(
        [*run_args(ckpt_dir, remote, "--flush-timeout", "2"), *cmd],
        cwd=tmp_path,
        env={"REMOTE": str(remote)},
    )

    assert _logged(tmp_path, "status")() == "69"
    [line] = error_lines((tmp_path / "child.log.err").read_text())
    assert line.startswith("ckpt: error: commit failed:"), line
    assert _logged(tmp_path, "read")() == "cannot be made durable", "saved locally all the same"


def test_ckpt_commit_outside_a_supervisor_names_ckpt_socket(tmp_path: Path) -> None:
    res = run_ckpt(["commit"], cwd=tmp_path, timeout=60)
    assert res.returncode == 78, res.stderr
    [line] = error_lines(res.stderr)
    assert "CKPT_SOCKET" in line


# ---------------------------------------------------------------- the functions, bare


def test_shell_functions_outside_a_supervisor(tmp_path: Path) -> None:
    src = tmp_path / "model.src"
    src.write_text("weights")
    res = _bash(
        f"""
        trap 'echo "previous trap"' USR1
        source {shlex.quote(str(SHIM))}   # twice: still one warning, one trap
        echo "dir $(ckpt_dir)"
        echo "attempt $(ckpt_attempt)"
        if ckpt_restored; then echo restored; else echo "restored none $?"; fi
        if ckpt_prev_exists; then echo "prev yes"; else echo "prev no $?"; fi
        if ckpt_read; then echo read; else echo "read none $?"; fi
        echo "state 1" | ckpt_write
        echo "read $(ckpt_read)"
        if ckpt_prev_exists; then echo "prev yes"; else echo "prev no"; fi
        ckpt_save {shlex.quote(str(src))}
        ckpt_save {shlex.quote(str(src))} nested/dir/model.bin
        ckpt_commit; ckpt_commit --no-wait; echo "commit $?"
        if ckpt_preemption_requested; then echo early; fi
        ckpt_on_preemption 'echo "callback ran"'
        kill -USR1 $$
        if ckpt_preemption_requested; then echo "preempted yes"; fi
        cd /
        echo "dir after cd $(ckpt_dir)"
        ckpt_retry "giving up for now"
        echo unreachable
        """,
        cwd=tmp_path,
    )

    assert res.returncode == 75, res.stderr
    ck = tmp_path / "checkpoints"
    assert res.stdout.splitlines() == [
        f"dir {ck}",
        "attempt 1",
        "restored none 1",
        "prev no 1",
        "read none 1",
        "read state 1",
        "prev yes",
        "commit 0",
        "callback ran",
        "previous trap",
        "preempted yes",
        f"dir after cd {ck}",
    ]
    assert [line for line in res.stderr.splitlines() if OUTSIDE in line] == [
        f"ckpt: warning: {OUTSIDE}: ckpt_commit only saves locally, checkpoints go to {ck}; "
        "no remote copy and no retries"
    ]
    assert res.stderr.splitlines()[-1] == "giving up for now"
    assert read_tree(ck) == {
        "payload": b"state 1\n",
        "model.src": b"weights",
        "nested/dir/model.bin": b"weights",
    }


def test_shell_functions_read_the_supervisor_env(tmp_path: Path) -> None:
    ck = tmp_path / "given"
    res = _bash(
        """
        echo "dir $(ckpt_dir)"
        echo "attempt $(ckpt_attempt)"
        echo "restored $(ckpt_restored)"
        """,
        cwd=tmp_path,
        env={"CKPT_DIR": str(ck), "CKPT_ATTEMPT": "3", "CKPT_RESTORED": "0a1b2c3d"},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"dir {ck}", "attempt 3", "restored 0a1b2c3d"]
    # CKPT_DIR is given: the one warning says nothing about ./checkpoints.
    assert "checkpoints go to" not in res.stderr and OUTSIDE in res.stderr


def test_hello_to_a_dead_socket_warns_and_the_script_goes_on(tmp_path: Path) -> None:
    res = _bash(
        'echo sourced; ckpt_commit || echo "commit failed $?"',
        cwd=tmp_path,
        env={
            "CKPT_SOCKET": str(tmp_path / "no.sock"),
            "CKPT_DIR": str(tmp_path / "ck"),
            "CKPT_BIN": str(Path(PY).parent / "ckpt"),
        },
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["sourced", "commit failed 78"]
    assert "could not tell the supervisor this script handles SIGUSR1" in res.stderr


@pytest.mark.parametrize("pattern", ckpt.TEMP_PATTERNS)
def test_prev_exists_ignores_every_temp_name_the_supervisor_ignores(
    tmp_path: Path, pattern: str
) -> None:
    ck = tmp_path / "ck"
    name = pattern.replace("*", "x")
    if "/" in name:
        pytest.skip("not a single name")
    (ck / name).parent.mkdir(parents=True, exist_ok=True)
    (ck / name).write_text("temp")
    res = _bash(
        f"""
        if ckpt_prev_exists; then echo yes; else echo no; fi
        ckpt_save {shlex.quote(str(ck / name))} {shlex.quote(name)} || echo "save refused $?"
        touch "$CKPT_DIR/real"
        if ckpt_prev_exists; then echo yes; else echo no; fi
        """,
        cwd=tmp_path,
        env={"CKPT_DIR": str(ck)},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["no", "save refused 2", "yes"]


def test_ckpt_save_refuses_what_it_cannot_save_and_leaves_no_temp_file(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    res = _bash(
        """
        ckpt_save "$PWD/missing.bin" || echo "missing $?"
        ckpt_save "$PWD" || echo "directory $?"
        echo x >src.bin
        ckpt_save src.bin ../escape.bin || echo "escape $?"
        ckpt_save src.bin /abs.bin || echo "absolute $?"
        ckpt_save || echo "usage $?"
        ckpt_save src.bin ok.bin && echo saved
        """,
        cwd=tmp_path,
        env={"CKPT_DIR": str(ck)},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "missing 1",
        "directory 1",
        "escape 2",
        "absolute 2",
        "usage 2",
        "saved",
    ]
    assert sorted(os.listdir(ck)) == ["ok.bin"]
    assert not (tmp_path / "escape.bin").exists()


def test_ckpt_save_and_write_keep_a_private_file_private(tmp_path: Path) -> None:
    """The temp file renamed over the target is made by mktemp (no name
    another user can guess and plant a link at) and gets the target's
    permission bits: a 0600 file rewritten from a 0644 source under umask
    022 stays 0600 (cp used to give the temp the source's 0644). A new file
    gets the umask's default; special bits are never carried over."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "model.bin").write_text("old")
    (ck / "model.bin").chmod(0o600)
    (ck / "payload").write_text("old")
    (ck / "payload").chmod(0o640)
    (ck / "tool.bin").write_text("old")
    (ck / "tool.bin").chmod(0o4755)
    src = tmp_path / "src.bin"
    src.write_text("new")
    src.chmod(0o644)
    res = _bash(
        """
        umask 022
        ckpt_save src.bin model.bin
        ckpt_save src.bin tool.bin
        ckpt_save src.bin fresh.bin
        echo "state 2" | ckpt_write
        """,
        cwd=tmp_path,
        env={"CKPT_DIR": str(ck)},
    )
    assert res.returncode == 0, res.stderr
    modes = {p.name: oct(p.stat().st_mode & 0o7777) for p in ck.iterdir()}
    assert modes == {
        "model.bin": "0o600",
        "payload": "0o640",
        "tool.bin": "0o755",
        "fresh.bin": "0o644",
    }
    assert (ck / "model.bin").read_text() == "new"
    assert (ck / "payload").read_text() == "state 2\n"
    shim = SHIM.read_text()
    assert "$RANDOM" not in shim and "mktemp" in shim
