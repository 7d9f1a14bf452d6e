"""Off a terminal (CI logs, startup scripts) ckpt prints plain lines and exits
with a status a job can branch on.

Every case runs the real binary with stdout and stderr as pipes and an
environment like a CI runner's: TERM=xterm-256color, CI=true,
GITHUB_ACTIONS=true, COLUMNS=40 (narrow, to catch wrapping), no NO_COLOR or
FORCE_COLOR. Then ckpt's stderr holds no control character but \\n and \\t;
every line of it is either one of the child's own lines, verbatim, or one of
ckpt's, starting with "ckpt: " and never hard-wrapped; the child's stdout
reaches ckpt's stdout byte for byte.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from stores import _SAFETY_ENV as SAFETY_ENV

from ._util import CKPT, RUN_TIMEOUT, ls_json, run_args, script

pytestmark = pytest.mark.timeout(180)

#: What a CI runner looks like to a process whose output goes to a log.
CI_ENV = {"TERM": "xterm-256color", "CI": "true", "GITHUB_ACTIONS": "true", "COLUMNS": "40"}
#: Anything that would make rich, click or typer colour or size their output.
NOT_IN_CI_ENV = (
    *("NO_COLOR", "FORCE_COLOR", "CLICOLOR_FORCE", "PY_COLORS"),
    *("TTY_COMPATIBLE", "TTY_INTERACTIVE", "LINES", "JUPYTER_COLUMNS"),
)
WIDTH = int(CI_ENV["COLUMNS"])

#: A child that writes a checkpoint file, logs its launch outside the
#: checkpoint dir, prints to stdout and stderr (long lines, a tab, UTF-8; on
#: stdout even an escape sequence of its own, which must pass untouched), then
#: exits with argv[2] on attempt 1 and argv[3] after (default: argv[2]).
CHILD = """
    import os, sys
    from pathlib import Path
    launches, first = Path(sys.argv[1]), int(sys.argv[2])
    later = int(sys.argv[3]) if len(sys.argv) > 3 else first
    attempt = int(os.environ["CKPT_ATTEMPT"])
    with open(launches, "a") as f:
        f.write(f"{attempt}\\n")
    d = Path(os.environ["CKPT_DIR"])
    d.mkdir(parents=True, exist_ok=True)
    (d / "state.tmp").write_text(f"attempt {attempt}\\n")
    os.replace(d / "state.tmp", d / "state.txt")
    out, err = sys.stdout.buffer, sys.stderr.buffer
    out.write(f"child out {attempt}: {'x' * 70}\\n".encode())
    out.write(f"child out {attempt}:\\tépoch \\u2192 \\x1b[1mbold\\x1b[0m\\n".encode())
    out.flush()
    err.write(f"child err {attempt}: {'y' * 70}\\n".encode())
    err.write(f"child err {attempt}:\\tépoch \\u2192 done\\n".encode())
    err.flush()
    sys.exit(first if attempt == 1 else later)
"""


def child_stdout(attempt: int) -> bytes:
    return (
        f"child out {attempt}: {'x' * 70}\nchild out {attempt}:\tépoch \u2192 \x1b[1mbold\x1b[0m\n"
    ).encode()


def child_stderr_lines(attempt: int) -> list[str]:
    return [f"child err {attempt}: {'y' * 70}", f"child err {attempt}:\tépoch \u2192 done"]


@dataclass(frozen=True)
class Result:
    code: int
    stdout: bytes
    stderr: bytes


def run_in_ci(args: list[str], *, cwd: Path, env: dict[str, str | None] | None = None) -> Result:
    """Run the real binary to completion, stdout and stderr pipes, CI-like env
    (on top of the isolated home every test gets from tests/conftest.py);
    a None in env removes that variable."""
    full_env = {k: v for k, v in os.environ.items() if k not in NOT_IN_CI_ENV}
    full_env.update(SAFETY_ENV)
    full_env.update(CI_ENV)
    for name, value in (env or {}).items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    res = subprocess.run(
        [str(CKPT), *args],
        cwd=cwd,
        env=full_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,  # pipes, not a terminal
        timeout=RUN_TIMEOUT,
        check=False,
    )
    return Result(res.returncode, res.stdout, res.stderr)


def control_chars(data: bytes) -> list[str]:
    """Each byte below 0x20 but \\n and \\t, and 0x7f, with its offset; and
    C1 controls (U+0080..U+009F, e.g. a one-character CSI) of the UTF-8 text."""
    found = [
        f"{i}:{b:#04x}" for i, b in enumerate(data) if (b < 0x20 and b not in b"\n\t") or b == 0x7F
    ]
    text = data.decode("utf-8", errors="replace")
    found += [f"char {i}:U+{ord(c):04X}" for i, c in enumerate(text) if 0x80 <= ord(c) <= 0x9F]
    return found


def ckpt_lines(res: Result, child_lines: Sequence[str] = ()) -> list[str]:
    """Check ckpt's stderr is plain and return ckpt's own lines in it.

    The child's lines (child_lines) must each appear verbatim, as whole lines;
    every other non-empty line must be ckpt's: "ckpt: ...", so a message
    wrapped onto a second line shows up as a line without the prefix."""
    shown = res.stderr.decode("utf-8", errors="replace")
    assert control_chars(res.stderr) == [], f"control characters in ckpt's stderr:\n{shown!r}"
    text = res.stderr.decode("utf-8")  # and it is UTF-8
    lines = text.split("\n")
    assert lines[-1] == "", f"stderr does not end with a newline: {text!r}"
    for line in child_lines:
        assert line in lines, f"the child's stderr line {line!r} did not pass through:\n{text}"
    own = [line for line in lines if line and line not in child_lines]
    stray = [line for line in own if not line.startswith("ckpt: ")]
    assert stray == [], f"stderr lines that are neither ckpt's nor the child's: {stray}\n{text}"
    return own


def assert_not_wrapped(own: list[str]) -> None:
    """ckpt said something longer than the 40 columns, on one line (the
    prefix rule above catches any continuation line)."""
    assert max(map(len, own), default=0) > WIDTH, f"no ckpt line over {WIDTH} chars: {own}"


def launches(path: Path) -> list[int]:
    return [int(n) for n in path.read_text().split()] if path.exists() else []


def child(tmp_path: Path, first: int, later: int | None = None) -> tuple[list[str], Path]:
    log = tmp_path / "launches.log"
    argv = [*script(tmp_path, "child.py", CHILD), str(log), str(first)]
    return ([*argv, str(later)] if later is not None else argv), log


# ---------------------------------------------------------------- ckpt run


def test_retry_then_success_exits_0_with_plain_lines(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, log = child(tmp_path, 75, 0)

    res = run_in_ci([*run_args(ckpt_dir, remote), *cmd], cwd=tmp_path)

    assert res.code == 0, res.stderr.decode(errors="replace")
    assert launches(log) == [1, 2]
    assert res.stdout == child_stdout(1) + child_stdout(2), "the child's stdout was altered"
    own = ckpt_lines(res, child_stderr_lines(1) + child_stderr_lines(2))
    assert_not_wrapped(own)
    assert ls_json(remote, cwd=tmp_path)["snapshots"], "the checkpoint was not uploaded"


def test_fatal_child_exit_is_passed_on(tmp_path: Path, remote: Path, ckpt_dir: Path) -> None:
    cmd, log = child(tmp_path, 3)

    res = run_in_ci([*run_args(ckpt_dir, remote), *cmd], cwd=tmp_path)

    assert res.code == 3, res.stderr.decode(errors="replace")
    assert launches(log) == [1]
    assert res.stdout == child_stdout(1)
    assert_not_wrapped(ckpt_lines(res, child_stderr_lines(1)))


def test_spent_retries_exit_with_the_childs_code(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, log = child(tmp_path, 75)

    res = run_in_ci([*run_args(ckpt_dir, remote, "--retries", "1"), *cmd], cwd=tmp_path)

    assert res.code == 75, res.stderr.decode(errors="replace")
    assert launches(log) == [1, 2]
    assert res.stdout == child_stdout(1) + child_stdout(2)
    assert_not_wrapped(ckpt_lines(res, child_stderr_lines(1) + child_stderr_lines(2)))


@pytest.mark.parametrize(
    ("flag", "codes"),
    [
        # A value the parser rejects: README "Exit statuses" has 2 for a
        # command line ckpt cannot parse, 78 for a flag it will not use.
        pytest.param(["--grace", "-1"], (2, 78), id="grace-negative"),
        pytest.param(["--dir", "FILE"], (78,), id="dir-is-a-file"),
    ],
)
def test_bad_flag_value_is_one_plain_error(
    tmp_path: Path, remote: Path, flag: list[str], codes: tuple[int, ...]
) -> None:
    (tmp_path / "FILE").write_text("not a directory")
    cmd, log = child(tmp_path, 0)
    args = ["run", "--remote", str(remote), *flag, "--", *cmd]

    res = run_in_ci(args, cwd=tmp_path)

    assert res.code in codes, res.stderr.decode(errors="replace")
    assert launches(log) == [], "the child started despite the bad flag"
    assert res.stdout == b""
    own = ckpt_lines(res)
    assert own, "no message at all"
    assert any(flag[0] in line for line in own), f"no line names {flag[0]}: {own}"


@pytest.mark.slow
def test_unreachable_remote_exits_69_before_the_child_starts(
    tmp_path: Path, ckpt_dir: Path
) -> None:
    if importlib.util.find_spec("s3fs") is None:
        pytest.skip("s3fs (the s3 extra) is not installed: run `bash tests/install.sh`")
    cmd, log = child(tmp_path, 0)
    env: dict[str, str | None] = {
        # Nothing listens on port 1; fake keys and no metadata lookup, so no
        # packet leaves 127.0.0.1 looking for credentials.
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEFAKE",
        "AWS_SECRET_ACCESS_KEY": "fake-secret-for-an-unreachable-endpoint",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_PROFILE": None,
        "AWS_ENDPOINT_URL": None,
        "AWS_ENDPOINT_URL_S3": None,
    }
    remote = "s3://ckpt-unreachable/run"
    endpoint = "client_kwargs.endpoint_url=http://127.0.0.1:1"
    args = [*run_args(ckpt_dir, remote, "--io-timeout", "2", "-o", endpoint), *cmd]

    res = run_in_ci(args, cwd=tmp_path, env=env)

    assert res.code == 69, res.stderr.decode(errors="replace")
    assert launches(log) == []
    assert res.stdout == b""
    own = ckpt_lines(res)
    errors = [line for line in own if line.startswith("ckpt: error:")]
    assert errors, own
    assert any(remote in line for line in errors), f"no error line names {remote}: {errors}"
    assert_not_wrapped(own)


# ---------------------------------------------------------------- ckpt ls


def test_ls_of_a_file_remote_is_one_plain_line_per_snapshot(
    tmp_path: Path, remote: Path, ckpt_dir: Path
) -> None:
    cmd, _ = child(tmp_path, 75, 0)
    made = run_in_ci([*run_args(ckpt_dir, remote), *cmd], cwd=tmp_path)
    assert made.code == 0, made.stderr.decode(errors="replace")
    snapshots = ls_json(remote, cwd=tmp_path)["snapshots"]
    assert snapshots

    res = run_in_ci(["ls", str(remote)], cwd=tmp_path)

    assert res.code == 0, res.stderr.decode(errors="replace")
    ckpt_lines(res)
    table = res.stdout.decode("utf-8")
    assert control_chars(res.stdout) == [], f"control characters in `ckpt ls`:\n{table!r}"
    rows = [line for line in table.split("\n") if line.strip()]
    # A header and one row per snapshot: no cell wrapped onto a second line,
    # no id truncated with an ellipsis to fit COLUMNS.
    assert len(rows) == 1 + len(snapshots), f"`ckpt ls` wrapped at {WIDTH} columns:\n{table}"
    assert "\u2026" not in table, f"`ckpt ls` truncated cells at {WIDTH} columns:\n{table}"
    for snap, row in zip(snapshots, rows[1:], strict=True):
        assert row.split()[0] == snap["id"], f"row {row!r} does not start with {snap['id']}"

    as_json = run_in_ci(["ls", str(remote), "--json"], cwd=tmp_path)
    assert as_json.code == 0
    ckpt_lines(as_json)
    assert json.loads(as_json.stdout)["snapshots"] == snapshots
