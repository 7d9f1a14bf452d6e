"""Bad values through the real binary: numbers that are not finite or out of
every sensible range, from each source (flag, env var, ckpt.toml, the control
socket); a stdout closed by its reader; a remote that keeps nothing; a
--log-json path in a directory that does not exist; the remote down during
the final flush (one warning about the run history, not one per retry).

Each refusal is one `ckpt: error:` line naming what to change, before the
child starts; the control socket answers every request, however bad, and
the run goes on.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import CKPT
from integration._util import PY, Running, error_lines, wait_for, write_script
from stores import Store

from ._io import Objects, ckpt, one_error
from ._tally import record

pytestmark = pytest.mark.timeout(240)

USAGE, UNAVAILABLE, CONFIG = 2, 69, 78
#: What a tool whose stdout reader went away exits with (128 + SIGPIPE).
PIPE_CLOSED = 141

MARK = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('ran')"


def _run(
    tmp_path: Path, *flags: str, env: dict[str, str] | None = None, remote: str | None = None
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`ckpt run FLAGS -- python MARK`: the result and the marker the child writes."""
    marker = tmp_path / "child-ran"
    args = ["run", "--dir", str(tmp_path / "ck"), "--remote", remote or str(tmp_path / "remote")]
    args += ["--backoff", "0", *flags, "--", PY, "-c", MARK, str(marker)]
    return ckpt(args, cwd=tmp_path, env=env), marker


def _args(tmp_path: Path, *command: str, flags: tuple[str, ...] = ()) -> list[str]:
    """`ckpt run FLAGS -- COMMAND` with a file remote, in tmp_path."""
    ck, remote = str(tmp_path / "ck"), str(tmp_path / "remote")
    return ["run", "--dir", ck, "--remote", remote, *flags, "--", *command]


# ---------------------------------------------------------------- options of `ckpt run`

#: (how it is given, source, expected exit, what the error line names)
BAD_OPTIONS: list[tuple[str, str, int, str]] = [
    ("--debounce nan", "flag", CONFIG, "--debounce"),
    ("CKPT_DEBOUNCE=nan", "env", CONFIG, "CKPT_DEBOUNCE"),
    ("debounce = nan", "toml", CONFIG, "debounce"),
    ("--grace inf", "flag", USAGE, "--grace"),
    ("CKPT_GRACE=inf", "env", CONFIG, "CKPT_GRACE"),
    ("grace = inf", "toml", CONFIG, "grace"),
    ("--grace 1e12", "flag", USAGE, "--grace"),
    ("--lease-timeout inf", "flag", USAGE, "--lease-timeout"),
    ("CKPT_LEASE_TIMEOUT=1e400", "env", CONFIG, "CKPT_LEASE_TIMEOUT"),
    ("lease-timeout = inf", "toml", CONFIG, "lease-timeout"),
    ("--io-timeout nan", "flag", CONFIG, "--io-timeout"),
    ("--rescan inf", "flag", USAGE, "--rescan"),
    ("--flush-timeout nan", "flag", CONFIG, "--flush-timeout"),
    ("CKPT_FLUSH_TIMEOUT=nan", "env", CONFIG, "CKPT_FLUSH_TIMEOUT"),
    ("--flush-timeout -inf", "flag", USAGE, "--flush-timeout"),
    ("--backoff 1:1e300", "flag", CONFIG, "--backoff"),
    ("--world-size 0", "flag", USAGE, "--world-size"),
    ("--world-size 99999999999999999999999", "flag", USAGE, "--world-size"),
    ("CKPT_WORLD_SIZE=2000000", "env", CONFIG, "CKPT_WORLD_SIZE"),
]


@pytest.mark.parametrize(
    ("given", "source", "status", "named"), BAD_OPTIONS, ids=[b[0] for b in BAD_OPTIONS]
)
def test_a_value_that_is_not_a_finite_number_in_range_is_refused_from_every_source(
    tmp_path: Path, given: str, source: str, status: int, named: str
) -> None:
    """Injected: NaN, +-inf and absurd durations as a flag, an env var and a
    ckpt.toml key. Asserted: one error line naming the option, the exit
    status of a bad flag (2 for a value out of a flag's range, else 78) and
    the child never started. (NaN used to pass every `x < min` check: `--debounce
    nan` silently turned off automatic snapshots; `--grace inf` printed
    "SIGKILL in infs"; a wait of inf seconds raised OverflowError.)"""
    flags: list[str] = []
    env: dict[str, str] = {}
    if source == "flag":
        flags = given.split(" ", 1)
    elif source == "env":
        name, value = given.split("=", 1)
        env[name] = value
    else:
        (tmp_path / "ckpt.toml").write_text(given + "\n")
    res, marker = _run(tmp_path, *flags, env=env)
    assert res.returncode == status, res.stderr
    line = one_error(res, named)
    assert "Traceback" not in res.stderr, res.stderr
    assert not marker.exists(), f"the child ran despite {given}: {line}"
    record("bad values", 1, what=given)


def test_flush_timeout_inf_waits_as_long_as_it_takes(tmp_path: Path) -> None:
    """Injected: --flush-timeout inf (and `inf` from ckpt.toml, as
    --print-config prints it). Asserted: it means "wait for the final
    snapshot as long as it takes": the run ends 0, durable (it used to exit 70:
    a wait of inf seconds raises OverflowError), and --print-config says inf."""
    save = "import os, pathlib; pathlib.Path(os.environ['CKPT_DIR'], 'state').write_text('x')"
    res = ckpt(_args(tmp_path, PY, "-c", save, flags=("--flush-timeout", "inf")), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "final state is durable" in res.stderr, res.stderr
    assert "unexpected error" not in res.stderr and "Traceback" not in res.stderr

    (tmp_path / "ckpt.toml").write_text("flush-timeout = inf\n")
    shown = ckpt(["run", "--print-config", "--", "true"], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    line = next(x for x in shown.stdout.splitlines() if x.startswith("flush-timeout"))
    assert line.split("#")[0].split("=")[1].strip() == "inf", line
    record("bad values", 1, what="--flush-timeout inf")


# ---------------------------------------------------------------- the control socket

SOCKET_CHILD = """
    import json, os, socket, sys

    path = os.environ["CKPT_SOCKET"]

    def ask(raw, timeout=30.0):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(raw)
            data = b""
            while not data.endswith(b"\\n"):
                more = s.recv(65536)
                if not more:
                    break
                data += more
        except socket.timeout:
            return "NO REPLY (timed out)"
        finally:
            s.close()
        return data.decode() if data else "NO REPLY (closed)"

    requests = {
        "timeout string": b'{"op": "commit", "timeout": "x"}\\n',
        "timeout 1e400": b'{"op": "commit", "timeout": 1e400}\\n',
        "timeout Infinity": b'{"op": "commit", "timeout": Infinity}\\n',
        "timeout negative": b'{"op": "commit", "timeout": -1}\\n',
        "wait string": b'{"op": "commit", "wait": "no"}\\n',
        "pid 1e400": b'{"op": "hello", "pid": 1e400}\\n',
        "pid 1.5": b'{"op": "hello", "pid": 1.5}\\n',
        "pid string": b'{"op": "hello", "pid": "1"}\\n',
        "pid NaN": b'{"op": "hello", "pid": NaN}\\n',
        "nested 50000 deep": b"[" * 50000 + b"\\n",
        "a list": b"[1, 2]\\n",
        "line too long": b"x" * (64 * 1024 + 100),  # no newline: never sent whole
        "status after all that": b'{"op": "status"}\\n',
    }
    replies = {name: ask(raw) for name, raw in requests.items()}
    with open(sys.argv[1], "w") as f:
        json.dump(replies, f)
"""


def test_every_control_socket_request_gets_one_reply_whatever_its_values(tmp_path: Path) -> None:
    """Injected: requests on the control socket with a string, 1e400,
    Infinity and a negative number as the commit timeout, a string as wait,
    1e400, 1.5, NaN and a string as a pid, JSON nested 50,000 deep, a list,
    and 64 KiB + 100 bytes with no newline. Asserted: each gets one reply
    line, `ok: false` with an error naming the field, promptly (the long one
    without the server waiting for its end); a status request still works;
    the run's stderr has no traceback and the run ends 0. (They used to kill
    the connection's thread with a traceback on the run's stderr and leave
    the client without a reply, and the server read the whole line before
    checking its length.)"""
    child = write_script(tmp_path / "child.py", SOCKET_CHILD)
    out = tmp_path / "replies.json"
    res = ckpt(_args(tmp_path, PY, str(child), str(out)), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    replies = json.loads(out.read_text())
    expect = {
        "timeout string": "timeout",
        "timeout 1e400": "timeout",
        "timeout Infinity": "timeout",
        "timeout negative": "timeout",
        "wait string": "wait",
        "pid 1e400": "pid",
        "pid 1.5": "pid",
        "pid string": "pid",
        "pid NaN": "pid",
        "nested 50000 deep": "JSON object",
        "a list": "JSON object",
        "line too long": "too long",
    }
    for name, word in expect.items():
        raw = replies[name]
        assert raw.endswith("\n") and raw.count("\n") == 1, f"{name}: {raw!r}"
        reply = json.loads(raw)
        assert reply["ok"] is False, f"{name}: {reply}"
        assert word in reply["error"], f"{name}: {reply}"
    status = json.loads(replies["status after all that"])
    assert status["ok"] is True, status
    record("bad values", len(expect), what="control socket requests")


def test_commit_timeout_or_step_out_of_range_is_a_bad_flag(tmp_path: Path) -> None:
    """Injected: `ckpt commit --timeout inf` (-1, 1e12, nan), `--step 2**70`
    and `--step -1` inside a run. Asserted: one line naming the flag, with
    the status docs/exit-statuses.md gives it, as for the flags of `ckpt
    run`: 2 for a value out of the flag's range, whichever end (--step 2**70
    and --timeout inf, -1 or 1e12 were 78, --step -1 was 2), 78 for a value
    that is no number (nan); the run goes on and ends 0. (The socket's
    refusal of the step used to come back as 69, "retry later".)"""
    cases = [("--timeout", v, USAGE) for v in ("inf", "-1", "1e12")]
    cases += [("--timeout", "nan", CONFIG)]
    cases += [("--step", str(2**70), USAGE), ("--step", "-1", USAGE)]
    body = f"""
        import json, subprocess, sys
        codes = []
        for flag, value in {[(flag, value) for flag, value, _ in cases]!r}:
            res = subprocess.run([{str(CKPT)!r}, "commit", flag, value],
                                 capture_output=True, text=True)
            codes.append([res.returncode, res.stderr])
        open(sys.argv[1], "w").write(json.dumps(codes))
    """
    child = write_script(tmp_path / "child.py", body)
    out = tmp_path / "codes.json"
    res = ckpt(_args(tmp_path, PY, str(child), str(out)), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for (flag, value, status), (code, err) in zip(cases, json.loads(out.read_text()), strict=True):
        assert code == status, f"{flag} {value}: {err}"
        assert len(error_lines(err)) == 1 and flag in err, err
    record("bad values", len(cases), what="ckpt commit --timeout, --step")


# ---------------------------------------------------------------- stdout closed, memory://


@pytest.fixture
def pushed(tmp_path: Path) -> Path:
    """A file remote with a few snapshots."""
    src = tmp_path / "src"
    src.mkdir()
    remote = tmp_path / "remote"
    for i in range(3):
        (src / f"f{i}.bin").write_bytes(os.urandom(100))
        res = ckpt(["push", str(src), str(remote)], cwd=tmp_path)
        assert res.returncode == 0, res.stderr
    return remote


@pytest.mark.parametrize(
    "command",
    [["ls", "{r}", "--json"], ["ls", "{r}"], ["show", "{r}"], ["verify", "{r}", "--json"]],
    ids=lambda c: " ".join(c).replace("{r}", "R"),
)
def test_a_closed_stdout_ends_a_command_quietly(
    tmp_path: Path, pushed: Path, command: list[str]
) -> None:
    """Injected: stdout is a pipe whose reader has gone (`ckpt ls R --json |
    head -1` once head has exited). Asserted: exit 141 (what a tool killed by
    SIGPIPE gives), no error on stderr, no crash log. (It used to exit 70 with
    a crash log, or 120 with "Exception ignored" when the output fitted the
    buffer.)"""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        res = subprocess.run(
            [str(CKPT), *(a.replace("{r}", str(pushed)) for a in command)],
            cwd=tmp_path,
            stdout=write_end,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=90,
            check=False,
        )
    finally:
        os.close(write_end)
    assert res.returncode == PIPE_CLOSED, res.stderr
    # ckpt's own lines may be there (`show` names the snapshot): nothing else
    assert all(line.startswith("ckpt: ") for line in res.stderr.splitlines()), res.stderr
    assert not error_lines(res.stderr) and "warning" not in res.stderr, res.stderr
    crashes = Path(os.environ["XDG_STATE_HOME"]) / "ckpt"
    assert not crashes.exists() or not list(crashes.iterdir()), list(crashes.iterdir())
    record("bad values", 1, what=f"closed stdout: {command[0]}")


def test_a_closed_stderr_silences_ckpt_and_the_run_goes_on(tmp_path: Path) -> None:
    """Injected: ckpt's stderr is a pipe whose reader has gone (`ckpt run ...
    2>&1 | head -3` once head has exited). Asserted: the run goes on to its
    end: the child's two saves are snapshotted and the final state is durable,
    exit 0. (rich's answer to a closed stream is SystemExit(1), which ended
    whatever thread printed: the supervisor, or its snapshot worker.)"""
    body = """
        import os, pathlib, sys, time
        d = pathlib.Path(os.environ["CKPT_DIR"])
        (d / "one").write_text("1")
        time.sleep(1.5)
        (d / "two").write_text("2")
    """
    child = write_script(tmp_path / "child.py", body)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        res = subprocess.run(
            [str(CKPT), *_args(tmp_path, PY, str(child), flags=("--debounce", "0.2"))],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=write_end,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert res.returncode == 0
    out = tmp_path / "out"
    restored = ckpt(["restore", str(tmp_path / "remote"), str(out)], cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert sorted(p.name for p in out.iterdir()) == ["one", "two"]
    record("bad values", 1, what="closed stderr during a run")


def test_a_memory_remote_is_refused_for_run_and_push(tmp_path: Path) -> None:
    """Injected: --remote memory://... for `ckpt run` and `ckpt push`.
    Asserted: 78 with one line saying that nothing outlives the process,
    before the child starts (it used to say "durable" and exit 0)."""
    res, marker = _run(tmp_path, remote="memory://ckpt-test/run")
    assert res.returncode == CONFIG, res.stderr
    one_error(res, "memory://", "--remote")
    assert not marker.exists()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    res = ckpt(["push", str(src), "memory://ckpt-test/push"], cwd=tmp_path)
    assert res.returncode == CONFIG, res.stderr
    one_error(res, "memory://")
    record("bad values", 2, what="memory:// remote")


def test_a_run_record_with_impossible_values_is_skipped(tmp_path: Path, pushed: Path) -> None:
    """Injected: run records (runs/*.json) with a start time of 1e400 and of
    -5, an end of NaN, and a preemption that is a string, beside a good one.
    Asserted: `ckpt ls --runs` and `ckpt ls --json` exit 0 and list the good
    record only (the bad ones made `ls --runs` exit 70: OverflowError,
    AttributeError), and the --json document is strict JSON (no NaN)."""
    good = {"format": "ckpt-run", "version": 1, "run": "good", "started": 1767225600}
    good |= {"attempts": [], "preemption": None, "host": "h", "outcome": "succeeded"}
    bad = {
        "inf-start": '"started": 1e400',
        "negative-start": '"started": -5',
        "nan-end": '"started": 5, "ended": NaN',
        "string-preemption": '"started": 5, "preemption": "x"',
    }
    (pushed / "runs").mkdir(exist_ok=True)
    (pushed / "runs" / "good.json").write_text(json.dumps(good))
    for run, fields in bad.items():
        text = f'{{"format": "ckpt-run", "version": 1, "run": "{run}", "attempts": [], {fields}}}'
        (pushed / "runs" / f"{run}.json").write_text(text)
    res = ckpt(["ls", str(pushed), "--runs"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "good" in res.stdout and not any(run in res.stdout for run in bad), res.stdout
    doc = ckpt(["ls", str(pushed), "--json"], cwd=tmp_path)
    assert doc.returncode == 0, doc.stderr
    runs = json.loads(doc.stdout, parse_constant=lambda c: pytest.fail(f"{c} in --json"))
    assert [r["run"] for r in runs["runs"]] == ["good"]
    record("bad values", len(bad), what="run records")


# ---------------------------------------------------------------- --log-json, history warnings


def test_log_json_in_a_missing_directory_is_refused_and_nothing_is_created(
    tmp_path: Path,
) -> None:
    """Injected: --log-json DIR/events where DIR does not exist (and where it
    is a regular file). Asserted: 78 with one line naming --log-json, before
    the child starts; no directory was created (it used to create every
    missing directory, up to the filesystem root)."""
    missing = tmp_path / "no" / "such" / "dir"
    res, marker = _run(tmp_path, "--log-json", str(missing / "events.jsonl"))
    assert res.returncode == CONFIG, res.stderr
    one_error(res, "--log-json", str(missing))
    assert not (tmp_path / "no").exists()
    assert not marker.exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    res, marker = _run(tmp_path, "--log-json", str(blocker / "events.jsonl"))
    assert res.returncode == CONFIG, res.stderr
    one_error(res, "--log-json")
    res, marker = _run(tmp_path, env={"CKPT_LOG_JSON": str(missing / "events.jsonl")})
    assert res.returncode == CONFIG, res.stderr
    one_error(res, "CKPT_LOG_JSON", "--log-json")
    assert not (tmp_path / "no").exists()
    record("bad values", 3, what="--log-json in a missing directory")


def test_remote_down_during_the_final_flush_warns_once_about_the_run_history(
    store_of: Any, tmp_path: Path
) -> None:
    """Injected: the S3 server stops for good after the first snapshot; the
    child then exits 0, so the final flush and the run history's last write
    fail. Asserted: 69 (not durable); the run history's failure is one
    warning, not one per retry after the summary (there used to be about
    19), and the snapshot worker's failures are not repeated after the final
    flush's own error line."""
    store: Store = store_of("s3-s3rver")
    assert store.server is not None
    objects = Objects(store.url, store.storage_options)
    go = tmp_path / "go"
    child = write_script(
        tmp_path / "child.py",
        """
        import os, sys, time
        from pathlib import Path
        d = Path(os.environ["CKPT_DIR"])
        (d / "a.txt").write_text("one")
        while not Path(sys.argv[1]).exists():
            time.sleep(0.05)
        (d / "a.txt").write_text("two, never durable")
        """,
    )
    args = ["run", "--dir", str(tmp_path / "ck"), "--remote", store.url, "--debounce", "0.2"]
    ck = Running(
        [*args, "--flush-timeout", "4", "--", PY, str(child), str(go)],
        cwd=tmp_path,
        logs=tmp_path / "logs",
        name="ckpt",
        env={**store.env, "CKPT_IO_TIMEOUT": "2", "AWS_MAX_ATTEMPTS": "1"},
    )
    try:
        wait_for(objects.manifests, what="the first snapshot", proc=ck)
        store.server.stop()
        go.touch()
        status = ck.wait(200)
    finally:
        ck.cleanup()
        if not store.server.running:
            store.server.start()
    err = ck.stderr()
    assert status == UNAVAILABLE, err
    history = [line for line in err.splitlines() if "run history" in line]
    assert len(history) <= 1, "\n".join(history)
    lines = err.splitlines()
    # "final snapshot not durable after 4s" or "final snapshot failed: ..."
    (gave_up,) = [i for i, line in enumerate(lines) if "error: final snapshot" in line]
    after = [line for line in lines[gave_up + 1 :] if "snapshot failed" in line]
    assert not after, "the worker's failures repeated after the flush gave up:\n" + err
    assert "Traceback" not in err, err
    record("bad values", 1, what="remote down: run history warnings")
