"""`ckpt run` end to end: resume after a recoverable failure, restore before
launch, the retry policy, output pass-through, bad input, the embedded store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ._util import (
    CKPT,
    RUN_TIMEOUT,
    error_lines,
    ls_json,
    manifest_paths,
    read_report,
    read_tree,
    reporter,
    restore_into,
    run_args,
    run_ckpt,
    script,
    writer,
)

pytestmark = pytest.mark.timeout(180)

# ---------------------------------------------------------------- 1. resume

#: Counts to N, saving {"i", "total"} after every iteration; appends each
#: iteration it executes (and each launch) to logs OUTSIDE the checkpoint dir;
#: on attempt 1 it asks for a retry (exit 75) when it reaches iteration 5.
COUNTER = """
    import json, os, sys, time
    from pathlib import Path
    n, log, launches = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    d = Path(os.environ["CKPT_DIR"])
    attempt = int(os.environ["CKPT_ATTEMPT"])
    state_file = d / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"i": 0, "total": 0}
    with open(launches, "a") as f:
        f.write(json.dumps({"attempt": attempt, "restored": os.environ["CKPT_RESTORED"],
                            "start": state["i"] + 1}) + "\\n")
    for i in range(state["i"] + 1, n + 1):
        if attempt == 1 and i == 5:
            sys.exit(75)
        with open(log, "a") as f:
            f.write(f"{i}\\n")
        state = {"i": i, "total": state["total"] + i}
        tmp = d / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, state_file)
        time.sleep(0.02)
"""


def test_recoverable_exit_resumes_and_runs_every_iteration_once(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    n = 12
    log, launches = tmp_path / "iterations.log", tmp_path / "launches.log"
    cmd = [*script(tmp_path, "counter.py", COUNTER), str(n), str(log), str(launches)]

    res = run_ckpt(
        [*run_args(ckpt_dir, remote, backoff="0.1"), *cmd], cwd=tmp_path, timeout=RUN_TIMEOUT
    )

    assert res.returncode == 0, res.stderr
    assert log.read_text().split() == [str(i) for i in range(1, n + 1)]
    runs = [json.loads(line) for line in launches.read_text().splitlines()]
    assert [r["attempt"] for r in runs] == [1, 2]
    assert runs[1]["start"] == 5, "attempt 2 must resume after iteration 4, not restart"
    final = {"i": n, "total": n * (n + 1) // 2}
    assert json.loads((ckpt_dir / "state.json").read_text()) == final
    # The final state is durable in the remote, not only on this disk.
    restore_into(remote, tmp_path / "fresh", cwd=tmp_path)
    assert json.loads((tmp_path / "fresh" / "state.json").read_text()) == final
    assert not list((tmp_path / "fresh").glob("*.tmp")), "temp files are never snapshotted"


# ---------------------------------------------------------------- 2. restore before launch


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_missing_or_empty_dir_is_restored_before_launch(
    tmp_path: Path, remote: Path, ckpt_dir: Path, how: str
) -> None:
    files = {"state.json": json.dumps({"step": 7}), "sub/extra.txt": "extra data\n"}
    res = run_ckpt([*run_args(ckpt_dir, remote), *writer(tmp_path, files)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    newest = ls_json(remote, cwd=tmp_path)["snapshots"][0]
    assert newest["files"] == 2

    shutil.rmtree(ckpt_dir)
    if how == "emptied":
        ckpt_dir.mkdir()
    report = tmp_path / "report.json"
    res = run_ckpt([*run_args(ckpt_dir, remote), *reporter(tmp_path, report)], cwd=tmp_path)

    assert res.returncode == 0, res.stderr
    seen = read_report(report)
    assert seen["CKPT_RESTORED"] == newest["id"]
    # The first run's attempt was 1: the count goes on across runs (run history).
    assert seen["CKPT_ATTEMPT"] == "2"
    assert seen["CKPT_DIR"] == os.path.realpath(ckpt_dir)
    assert seen["files"] == files
    assert f"restored snapshot {newest['id']}" in res.stderr


def test_first_run_on_empty_remote_gets_empty_restored(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    report = tmp_path / "report.json"
    res = run_ckpt([*run_args(ckpt_dir, remote), *reporter(tmp_path, report)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    seen = read_report(report)
    assert seen["CKPT_RESTORED"] == ""
    assert seen["CKPT_ATTEMPT"] == "1"
    assert seen["CKPT_RUN"]
    assert seen["CKPT_SOCKET"]
    assert ckpt_dir.is_dir()


# ---------------------------------------------------------------- 3./4. retry policy

#: Appends its attempt number to argv[1], then ends as argv[2] says:
#: an exit code, "kill:SIG" (signal itself), or "kill-first:SIG" (only on attempt 1).
ENDER = """
    import os, signal, sys
    attempt = os.environ["CKPT_ATTEMPT"]
    with open(sys.argv[1], "a") as f:
        f.write(attempt + "\\n")
    how = sys.argv[2]
    if how.startswith("kill"):
        kind, name = how.split(":")
        if kind == "kill" or attempt == "1":
            sig = getattr(signal, name)
            if sig == signal.SIGINT:
                signal.signal(sig, signal.SIG_DFL)  # else Python raises KeyboardInterrupt
            os.kill(os.getpid(), sig)
            signal.pause()
        sys.exit(0)
    sys.exit(int(how))
"""


def _ender(tmp_path: Path, how: str) -> tuple[list[str], Path]:
    launches = tmp_path / "launches.log"
    return [*script(tmp_path, "ender.py", ENDER), str(launches), how], launches


def _launches(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_fatal_exit_code_is_passed_through_without_retry(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, launches = _ender(tmp_path, "3")
    res = run_ckpt([*run_args(ckpt_dir, remote, "--retries", "5"), *cmd], cwd=tmp_path)
    assert res.returncode == 3, res.stderr
    assert _launches(launches) == ["1"]
    assert len(error_lines(res.stderr)) == 1, res.stderr


def test_retries_spent_passes_the_last_exit_on(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, launches = _ender(tmp_path, "75")
    res = run_ckpt([*run_args(ckpt_dir, remote, "--retries", "2"), *cmd], cwd=tmp_path)
    assert res.returncode == 75, res.stderr
    assert _launches(launches) == ["1", "2", "3"]
    assert "retries spent" in res.stderr


def test_child_killed_by_sigkill_is_retried_by_default(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, launches = _ender(tmp_path, "kill-first:SIGKILL")
    res = run_ckpt([*run_args(ckpt_dir, remote), *cmd], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert _launches(launches) == ["1", "2"]


def test_child_always_killed_reports_128_plus_signal(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, launches = _ender(tmp_path, "kill:SIGKILL")
    res = run_ckpt([*run_args(ckpt_dir, remote, "--retries", "1"), *cmd], cwd=tmp_path)
    assert res.returncode == 128 + 9, res.stderr
    assert _launches(launches) == ["1", "2"]


def test_child_killed_by_sigint_is_not_retried(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, launches = _ender(tmp_path, "kill:SIGINT")
    res = run_ckpt([*run_args(ckpt_dir, remote, "--retries", "3"), *cmd], cwd=tmp_path)
    assert res.returncode == 130, res.stderr
    assert _launches(launches) == ["1"]


# ---------------------------------------------------------------- 12. output

CHILD_OUT = "first line\n\tindented ünïcode line  \n\nlast line without newline".encode()
CHILD_ERR = b"child error line\nchild stderr tail without newline"

TALKER = """
    import sys
    out = bytes.fromhex(sys.argv[1])
    err = bytes.fromhex(sys.argv[2])
    half = len(out) // 2
    sys.stdout.buffer.write(out[:half]); sys.stdout.buffer.flush()
    sys.stdout.buffer.write(out[half:]); sys.stdout.buffer.flush()
    sys.stderr.buffer.write(err); sys.stderr.buffer.flush()
"""


def test_child_output_passes_through_untouched(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd = [*script(tmp_path, "talker.py", TALKER), CHILD_OUT.hex(), CHILD_ERR.hex()]
    res = subprocess.run(
        [str(CKPT), *run_args(ckpt_dir, remote), *cmd],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    # stdout belongs to the child alone, byte for byte.
    assert res.stdout == CHILD_OUT
    # The child's stderr appears whole; everything else on stderr is ckpt's,
    # one plain-text line each, prefixed "ckpt:".
    assert res.stderr.count(CHILD_ERR) == 1, res.stderr
    rest = res.stderr.replace(CHILD_ERR, b"\n", 1)
    ours = [line for line in rest.split(b"\n") if line]
    assert len(ours) >= 3, res.stderr
    assert all(line.startswith(b"ckpt: ") for line in ours), res.stderr
    assert b"\x1b" not in res.stderr, "no terminal control sequences off a terminal"


#: Copies its stdin, byte for byte, to argv[1].
CAT_STDIN = """
    import sys
    from pathlib import Path
    Path(sys.argv[1]).write_bytes(sys.stdin.buffer.read())
"""


def test_child_stdin_is_its_own(tmp_path: Path, remote: Path, ckpt_dir: Path) -> None:
    got = tmp_path / "stdin.bin"
    data = b"line for the child\nsecond line without newline \xff"
    cmd = [*script(tmp_path, "cat_stdin.py", CAT_STDIN), str(got)]
    res = subprocess.run(
        [str(CKPT), *run_args(ckpt_dir, remote), *cmd],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        timeout=RUN_TIMEOUT,
        input=data,
    )
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert got.read_bytes() == data


# ---------------------------------------------------------------- 14. bad input


def test_unknown_flag_is_a_usage_error(tmp_path: Path, remote: Path, ckpt_dir: Path) -> None:
    cmd, launches = _ender(tmp_path, "0")
    res = run_ckpt([*run_args(ckpt_dir, remote, "--no-such-flag"), *cmd], cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "--no-such-flag" in res.stderr
    assert _launches(launches) == []


def test_dir_that_is_a_regular_file_is_refused(tmp_path: Path, remote: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    cmd, launches = _ender(tmp_path, "0")
    res = run_ckpt([*run_args(afile, remote), *cmd], cwd=tmp_path)
    assert res.returncode == 78, res.stderr
    errors = error_lines(res.stderr)
    assert len(errors) == 1, res.stderr
    assert os.path.realpath(afile) in errors[0] and "--dir" in errors[0]
    assert "Traceback" not in res.stderr
    assert _launches(launches) == []
    assert afile.read_text() == "not a directory"


@pytest.mark.parametrize("where", ["remote-in-dir", "dir-in-remote"])
def test_remote_and_dir_nested_is_refused(tmp_path: Path, where: str) -> None:
    if where == "remote-in-dir":
        ckpt_dir, remote = tmp_path / "ck", tmp_path / "ck" / "remote"
    else:
        remote, ckpt_dir = tmp_path / "remote", tmp_path / "remote" / "ck"
    cmd, launches = _ender(tmp_path, "0")
    res = run_ckpt([*run_args(ckpt_dir, remote), *cmd], cwd=tmp_path)
    assert res.returncode == 78, res.stderr
    assert len(error_lines(res.stderr)) == 1, res.stderr
    assert "inside" in error_lines(res.stderr)[0]
    assert _launches(launches) == []


@pytest.mark.parametrize("command", ["no-such-command-ckpt-test", "/nonexistent/bin/train"])
def test_missing_command_is_an_error_naming_it(
    tmp_path: Path, remote: Path, ckpt_dir: Path, command: str
) -> None:
    res = run_ckpt([*run_args(ckpt_dir, remote), command, "--flag"], cwd=tmp_path, timeout=60)
    assert res.returncode != 0
    errors = error_lines(res.stderr)
    assert len(errors) == 1, res.stderr
    assert command in errors[0]
    assert "Traceback" not in res.stderr
    assert not (remote / "lease.json").exists(), "the lease must be released on the way out"


@pytest.mark.parametrize(("flag", "value"), [("--retry-on", "bogus"), ("--backoff", "soon")])
def test_bad_flag_value_is_config_error(
    tmp_path: Path, remote: Path, ckpt_dir: Path, flag: str, value: str
) -> None:
    cmd, launches = _ender(tmp_path, "0")
    res = run_ckpt([*run_args(ckpt_dir, remote, flag, value), *cmd], cwd=tmp_path)
    assert res.returncode == 78, res.stderr
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and value in errors[0], res.stderr
    assert _launches(launches) == []
    assert not remote.exists(), "bad configuration is refused before the remote is touched"


# ---------------------------------------------------------------- 15. embedded store


def test_default_embedded_store_is_named_and_restored_from(tmp_path: Path, ckpt_dir: Path) -> None:
    store_root = Path(os.environ["XDG_DATA_HOME"]) / "ckpt" / "store"
    files = {"model.txt": "weights v1"}
    res = run_ckpt([*run_args(ckpt_dir, None), *writer(tmp_path, files)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "embedded" in res.stderr and str(store_root) in res.stderr, res.stderr
    stores = [p for p in store_root.iterdir() if (p / "ckpt.json").exists()]
    assert len(stores) == 1, list(store_root.iterdir())
    store = stores[0]
    newest = ls_json(store, cwd=tmp_path)["snapshots"][0]

    shutil.rmtree(ckpt_dir)
    report = tmp_path / "report.json"
    res = run_ckpt([*run_args(ckpt_dir, None), *reporter(tmp_path, report)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    seen = read_report(report)
    assert seen["CKPT_RESTORED"] == newest["id"]
    assert seen["files"] == files
    assert str(store) in res.stderr
    assert read_tree(ckpt_dir) == {"model.txt": b"weights v1"}
    assert manifest_paths(store)


# ---------------------------------------------------------------- commit from the child

#: Saves state, runs `ckpt commit` (argv[1]), then looks at the remote (argv[2])
#: itself: the committed state must be there when commit returns.
COMMITTER = """
    import json, os, subprocess, sys
    from pathlib import Path
    ckpt, remote, report = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    d = Path(os.environ["CKPT_DIR"])
    (d / "state.txt").write_text("committed state")
    res = subprocess.run([ckpt, "commit"], capture_output=True, text=True)
    seen = []
    for p in sorted((remote / "snapshots").glob("*.json")):
        doc = json.loads(p.read_text())
        seen.append({"id": doc["id"],
                     "sizes": {e["path"]: e.get("size") for e in doc["entries"]}})
    report.write_text(json.dumps({"code": res.returncode, "stderr": res.stderr,
                                  "snapshots": seen}))
"""


def test_commit_from_the_child_returns_once_the_state_is_durable(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    report = tmp_path / "report.json"
    cmd = [*script(tmp_path, "committer.py", COMMITTER), str(CKPT), str(remote), str(report)]
    # A debounce far longer than the run: only the commit can snapshot meanwhile.
    res = run_ckpt([*run_args(ckpt_dir, remote, debounce="3600"), *cmd], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    seen = json.loads(report.read_text())
    assert seen["code"] == 0, seen["stderr"]
    assert seen["snapshots"], "commit returned before any snapshot was durable"
    newest = seen["snapshots"][-1]
    assert newest["sizes"].get("state.txt") == len("committed state")
    assert newest["id"] in seen["stderr"]


# ---------------------------------------------------------------- the dir lost between attempts

#: Attempt 1 saves state, commits it, deletes the whole checkpoint dir (a lost
#: local disk) and asks for a retry; every attempt reports what it found.
LOSES_DIR = """
    import json, os, shutil, subprocess, sys
    from pathlib import Path
    ckpt, log = sys.argv[1], Path(sys.argv[2])
    d = Path(os.environ["CKPT_DIR"])
    attempt = os.environ["CKPT_ATTEMPT"]
    files = sorted(p.name for p in d.iterdir()) if d.is_dir() else None
    state = (d / "state.txt").read_text() if (d / "state.txt").exists() else None
    with open(log, "a") as f:
        f.write(json.dumps({"attempt": attempt, "restored": os.environ["CKPT_RESTORED"],
                            "files": files, "state": state}) + "\\n")
    if attempt == "1":
        (d / "state.txt").write_text("saved by attempt 1")
        subprocess.run([ckpt, "commit"], check=True)
        shutil.rmtree(d)
        sys.exit(75)
"""


def test_dir_lost_between_attempts_is_restored_before_the_retry(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    log = tmp_path / "attempts.log"
    cmd = [*script(tmp_path, "loses_dir.py", LOSES_DIR), str(CKPT), str(log)]
    res = run_ckpt([*run_args(ckpt_dir, remote), *cmd], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["attempt"] for r in runs] == ["1", "2"]
    newest = ls_json(remote, cwd=tmp_path)["snapshots"][0]
    assert runs[1]["state"] == "saved by attempt 1"
    assert runs[1]["restored"] == newest["id"]


# ---------------------------------------------------------------- remote failing

#: Breaks the remote (its snapshots/ becomes a regular file), then saves state.
BREAKS_REMOTE = """
    import os, shutil, sys
    from pathlib import Path
    remote = Path(sys.argv[1])
    shutil.rmtree(remote / "snapshots", ignore_errors=True)
    (remote / "snapshots").write_text("not a directory any more")
    (Path(os.environ["CKPT_DIR"]) / "state.txt").write_text("cannot be uploaded")
"""


def test_child_success_that_cannot_be_made_durable_exits_69(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd = [*script(tmp_path, "breaks_remote.py", BREAKS_REMOTE), str(remote)]
    res = run_ckpt([*run_args(ckpt_dir, remote, "--flush-timeout", "2"), *cmd], cwd=tmp_path)
    assert res.returncode == 69, res.stderr
    assert "not durable" in res.stderr
    assert (ckpt_dir / "state.txt").read_text() == "cannot be uploaded", "local state is kept"
