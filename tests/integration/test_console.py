"""The console of `ckpt run`: the JSON event log (--log-json), `ckpt status`
from another shell, --quiet / --verbose, and a run in a real pseudo-terminal:
the child's lines arrive intact, the live status shows in the terminal's
title, and the run ends with a summary table."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ._util import CKPT, PY, Running, run_args, run_ckpt, script, wait_for

pytestmark = pytest.mark.timeout(180)

#: Exits 75 on its first attempt, 0 on the second, writing a state file each time.
TWICE = """
    import os, pathlib, sys
    d = pathlib.Path(os.environ["CKPT_DIR"])
    n = os.environ["CKPT_ATTEMPT"]
    (d / "state.txt").write_text(n)
    sys.exit(75 if n == "1" else 0)
"""


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_json_has_one_versioned_object_per_event(
    tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    log = tmp_path / "logs" / "ckpt.jsonl"
    log.parent.mkdir()  # ckpt creates no directory for it
    res = run_ckpt(
        [*run_args(ckpt_dir, remote, "--log-json", str(log)), *script(tmp_path, "t.py", TWICE)],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    events = _events(log)
    names = [e["event"] for e in events]
    assert names[0] == "start" and names[-1] == "end", names
    assert names.index("fresh") < names.index("launch")
    assert [e["attempt"] for e in events if e["event"] == "launch"] == [1, 2]
    assert [e["status"] for e in events if e["event"] == "exit"] == [75, 0]
    (retry,) = [e for e in events if e["event"] == "retry"]
    assert (retry["retry"], retry["retries"]) == (1, 3)
    assert any(e["event"] == "snapshot" and e["files"] == 1 for e in events)
    end = events[-1]
    assert end["status"] == 0 and end["outcome"] == "succeeded" and end["attempts"] == 2
    run_ids = {e["run"] for e in events}
    assert len(run_ids) == 1
    for e in events:
        assert e["v"] == 1
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]), e
        assert abs(e["ts"] - time.time()) < 3600

    # A second run appends to the same file, and the env var works like the flag.
    again = run_ckpt(
        [*run_args(ckpt_dir, remote), PY, "-c", "raise SystemExit(3)"],
        cwd=tmp_path,
        env={"CKPT_LOG_JSON": str(log)},
    )
    assert again.returncode == 3, again.stderr
    more = _events(log)[len(events) :]
    assert [e["event"] for e in more][-2:] == ["give_up", "end"]
    assert more[-2]["reason"] == "not retried (--retry-on)" and more[-1]["status"] == 3


def test_log_json_that_cannot_be_written_warns_once_and_the_run_goes_on(
    tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    """/dev/full opens and refuses every write (ENOSPC), as a full disk would
    once the run is under way. (A path ckpt would not create a file at is
    refused before the run: tests/faults/test_bad_values.py.)"""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    res = run_ckpt(
        [*run_args(ckpt_dir, remote, "--log-json", "/dev/full"), PY, "-c", "pass"],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("--log-json") == 1, res.stderr


def test_status_from_another_shell_shows_the_running_supervisor(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    ready = tmp_path / "ready"
    body = f"""
        import os, pathlib, time
        pathlib.Path(os.environ["CKPT_DIR"], "w.bin").write_bytes(os.urandom(1 << 20))
        pathlib.Path({str(ready)!r}).write_text(str(os.getpid()))
        time.sleep(600)
    """
    ckpt = spawn([*run_args(ckpt_dir, remote), *script(tmp_path, "w.py", body)])
    wait_for(ready.exists, what="the child", proc=ckpt)
    child = int(ready.read_text())
    ckpt.extra_pids.append(child)
    env = {k: v for k, v in os.environ.items() if k != "CKPT_SOCKET"}

    def durable() -> dict[str, Any] | None:
        res = subprocess.run(
            [str(CKPT), "status", "--json"], env=env, capture_output=True, text=True, check=True
        )
        runs = json.loads(res.stdout)["runs"]
        return runs[0] if runs and runs[0]["last_snapshot"] else None

    st = wait_for(durable, what="a durable snapshot in `ckpt status`", proc=ckpt)
    assert st["child_pid"] == child and st["attempt"] == 1
    assert st["dir"] == str(ckpt_dir.resolve())
    assert st["backlog_bytes"] == 0 and st["last_snapshot_age"] >= 0

    text = subprocess.run(
        [str(CKPT), "status"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert f"child: pid {child}, attempt 1" in text, text
    assert f"newest durable snapshot: {st['last_snapshot']}" in text, text

    ckpt.signal(signal.SIGTERM)
    assert ckpt.wait() == 143
    after = subprocess.run(
        [str(CKPT), "status"], env=env, capture_output=True, text=True, check=False
    )
    assert after.returncode == 0
    assert "no ckpt run is running" in after.stderr, after.stderr


def test_status_with_a_dead_socket_is_one_line(tmp_path: Path) -> None:
    res = run_ckpt(["status", "--socket", str(tmp_path / "nope.sock")], cwd=tmp_path)
    assert res.returncode == 69, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("ckpt: error:")]
    assert len(lines) == 1 and "nope.sock" in lines[0], res.stderr


def test_quiet_prints_errors_only_and_verbose_adds_debug(
    tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    cmd = [PY, "-c", "raise SystemExit(3)"]
    quiet = run_ckpt([*run_args(ckpt_dir, remote, "--quiet"), *cmd], cwd=tmp_path)
    assert quiet.returncode == 3
    assert quiet.stderr.splitlines() and all(
        line.startswith("ckpt: error:") for line in quiet.stderr.splitlines()
    ), quiet.stderr
    verbose = run_ckpt([*run_args(ckpt_dir, remote, "--verbose"), *cmd], cwd=tmp_path)
    assert "ckpt: debug: child env: CKPT_ATTEMPT=" in verbose.stderr, verbose.stderr
    plain = run_ckpt([*run_args(ckpt_dir, remote), *cmd], cwd=tmp_path)
    assert "debug:" not in plain.stderr


# ---------------------------------------------------------------- a real terminal

OSC_TITLE = re.compile(rb"\x1b\]0;([^\x07]*)\x07")
TITLE_STACK = re.compile(rb"\x1b\[2[23];0t")


def _run_in_pty(args: list[str], cwd: Path, timeout: float = 90) -> tuple[int, bytes]:
    """Run the real binary with a pseudo-terminal as its stdin, stdout and
    stderr (as in an interactive shell); everything it and its child wrote."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [str(CKPT), *args], cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave
    )
    os.close(slave)
    out = bytearray()
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
        status = proc.wait(timeout=max(1.0, end - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return status, bytes(out)


def test_in_a_terminal_child_lines_are_intact_and_the_status_is_in_the_title(
    tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    """A child that prints 60 numbered lines over 3 s, some in colour: after
    removing ckpt's title sequences, every line is there exactly as printed
    (nothing wrapped, prefixed or split), the title showed the live status,
    the title was given back at the end, and the summary table was printed."""
    body = """
        import os, pathlib, sys, time
        d = pathlib.Path(os.environ["CKPT_DIR"])
        for i in range(60):
            colour = "\\x1b[32m" if i % 7 == 0 else ""
            reset = "\\x1b[0m" if colour else ""
            # One write per line: print() on a terminal writes the text and
            # the newline in two writes, and a line of ckpt's may land between
            # them (two writers on one terminal; ckpt never touches the child's).
            sys.stdout.write(f"{colour}child line {i:03d} " + "x" * 50 + reset + "\\n")
            sys.stdout.flush()
            if i % 10 == 0:
                (d / f"step-{i}.txt").write_text(str(i))
            time.sleep(0.05)
    """
    status, raw = _run_in_pty(
        [*run_args(ckpt_dir, remote), *script(tmp_path, "printer.py", body)], cwd=tmp_path
    )
    assert status == 0, raw.decode(errors="replace")
    titles = [t.decode() for t in OSC_TITLE.findall(raw)]
    assert any(t.startswith("ckpt: attempt 1") for t in titles), titles
    assert raw.count(b"\x1b[22;0t") == 1 and raw.count(b"\x1b[23;0t") == 1, "title push/pop"
    assert raw.rindex(b"\x1b[23;0t") > raw.rindex(b"\x1b]0;"), "the old title comes back last"
    text = TITLE_STACK.sub(b"", OSC_TITLE.sub(b"", raw)).decode()
    lines = text.replace("\r\n", "\n").split("\n")
    for i in range(60):
        expected = f"child line {i:03d} " + "x" * 50
        if i % 7 == 0:
            expected = f"\x1b[32m{expected}\x1b[0m"
        assert expected in lines, f"line {i} not intact:\n{text}"
    assert "attempt" in text and "exit code 0" in text
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)  # the table's own bold and italics
    assert re.search(r"attempt\s+exit\s+duration", plain), plain
    assert re.search(r"\n1\s+exit code 0\s+\d+s", plain), plain


def test_off_a_terminal_there_is_no_title_and_no_control_character(
    tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    res = run_ckpt(
        [*run_args(ckpt_dir, remote), PY, "-c", "import time; time.sleep(2.5)"], cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert "\x1b" not in res.stderr and "\x07" not in res.stderr


def test_push_and_restore_show_a_progress_bar_in_a_terminal_only(
    tmp_path: Path, remote: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(24 << 20))
    status, raw = _run_in_pty(["push", str(src), str(remote)], cwd=tmp_path)
    assert status == 0, raw.decode(errors="replace")
    assert b"pushing" in raw and b"MiB" in raw, raw.decode(errors="replace")
    status, raw = _run_in_pty(["restore", str(remote), str(tmp_path / "out")], cwd=tmp_path)
    assert status == 0, raw.decode(errors="replace")
    assert b"restoring into" in raw, raw.decode(errors="replace")
    assert (tmp_path / "out" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    plain = run_ckpt(["restore", str(remote), str(tmp_path / "out2")], cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    # Off a terminal no bar: one plain line when the wait starts, one when it ends.
    assert plain.stderr.count("restoring into") == 1, plain.stderr
    assert f"ckpt: restoring into {tmp_path / 'out2'}\n" in plain.stderr
    assert "\x1b" not in plain.stderr and "\r" not in plain.stderr


def test_log_json_ends_with_an_end_event_when_ckpt_fails_before_the_launch(
    tmp_path: Path, ckpt_dir: Path
) -> None:
    """A remote ckpt will not use (garbage ckpt.json): one error line, 78, and
    the event log still says how the run ended."""
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "ckpt.json").write_text("not json")
    log = tmp_path / "events.jsonl"
    res = run_ckpt(
        [*run_args(ckpt_dir, remote, "--log-json", str(log)), PY, "-c", "pass"], cwd=tmp_path
    )
    assert res.returncode == 78, res.stderr
    events = _events(log)
    assert [e["event"] for e in events] == ["start", "end"]
    assert events[-1]["status"] == 78 and events[-1]["outcome"].startswith("error: ")


def test_a_quiet_push_never_imports_rich(tmp_path: Path) -> None:
    """rich is imported when ckpt first prints (25-30 ms of a no-change push
    of bench/ case 4); `ckpt push -q` prints nothing, so it never pays."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 100)
    repo = tmp_path / "repo"

    def push(*flags: str) -> str:
        res = subprocess.run(
            [PY, "-X", "importtime", "-m", "ckpt_cli", "push", *flags, str(src), str(repo)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        return res.stderr

    assert " rich" not in push("-q")  # the first push
    assert " rich" not in push("-q")  # nothing changed
    loud = push()
    assert " rich.console" in loud and "nothing changed since snapshot" in loud
