"""`ckpt run --preemption`: the real binary polls a fake metadata service on
127.0.0.1 (tests/metadata.py) through CKPT_METADATA_URL, and a notice makes it
tell the child, snapshot, stop the child in time, flush and exit PREEMPTED
(79) without a relaunch. The run history in the repository carries
CKPT_ATTEMPT across runs (machines), and `ckpt ls` shows it.

The autouse fixture points CKPT_DMI_DIR at an empty dir, so `auto` sees no
cloud unless a test gives it a fake DMI dir: no test can reach a real
metadata address."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckpt import ExitCode
from ckpt_cli.run.signals import ECHO_WINDOW
from metadata import MetadataServer

from ._util import (
    PY,
    Running,
    error_lines,
    ls_json,
    pid_gone,
    read_tree,
    restore_into,
    run_args,
    run_ckpt,
    script,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

#: A training loop that cooperates: argv[1] is its ready file (outside --dir),
#: argv[2] what it does on the checkpoint signal ("save-exit75": save and exit
#: 75, "save-go-on": save and keep going, "ignore": no handler at all);
#: on SIGTERM it saves "term.txt" and exits 143 (or, with argv[3] == "exit0", 0).
TRAINER = """
    import json, os, signal, sys, time
    from pathlib import Path
    import ckpt

    d = Path(os.environ["CKPT_DIR"])
    ready, mode = Path(sys.argv[1]), sys.argv[2]
    term_exit = 0 if sys.argv[3:] == ["exit0"] else 143
    flag = {"notice": False}

    def save(name, text):
        tmp = d / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, d / name)

    def on_term(signum, frame):
        save("term.txt", "saved on SIGTERM")
        sys.exit(term_exit)

    if mode != "ignore":
        ckpt.on_preemption(lambda: flag.update(notice=True))
    signal.signal(signal.SIGTERM, on_term)
    save("state.txt", "step 1")
    info = {"pid": os.getpid(), "attempt": os.environ["CKPT_ATTEMPT"]}
    tmp = ready.with_name(ready.name + ".part")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, ready)
    while True:
        if flag["notice"]:
            flag["notice"] = False
            save("notice.txt", "saved on the notice")
            if mode == "save-exit75":
                sys.exit(75)
        time.sleep(0.02)
"""


def _env(metadata: MetadataServer, mode: str = "gcp") -> dict[str, str]:
    return {"CKPT_METADATA_URL": metadata.url, "CKPT_PREEMPTION": mode}


def _start(
    spawn: Callable[..., Running],
    tmp_path: Path,
    ckpt_dir: Path,
    remote: Path,
    mode: str,
    *extra: str,
    env: dict[str, str],
    term: str = "",
) -> tuple[Running, dict[str, Any]]:
    ready = tmp_path / "ready.json"
    cmd = [*script(tmp_path, "trainer.py", TRAINER), str(ready), mode, *([term] if term else [])]
    ckpt = spawn([*run_args(ckpt_dir, remote, *extra), *cmd], env=env)
    wait_for(ready.exists, what="the child to start", proc=ckpt)
    info: dict[str, Any] = json.loads(ready.read_text())
    ckpt.extra_pids.append(int(info["pid"]))
    return ckpt, info


def _runs(remote: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((remote / "runs").glob("*.json"))]


def test_gcp_notice_child_saves_and_exits_then_ckpt_exits_preempted_without_relaunch(
    spawn: Callable[..., Running],
    tmp_path: Path,
    ckpt_dir: Path,
    remote: Path,
    metadata: MetadataServer,
) -> None:
    ckpt, info = _start(spawn, tmp_path, ckpt_dir, remote, "save-exit75", env=_env(metadata, "gcp"))
    assert metadata.wait_gcp_waiting(timeout=30), "ckpt never waited on instance/preempted"

    metadata.gcp_preempt()

    assert ckpt.wait() == ExitCode.PREEMPTED, ckpt.stderr()
    stderr = ckpt.stderr()
    assert "preemption notice: gcp preempted" in stderr, stderr
    assert "attempt 2" not in stderr, "a preempted run must not relaunch on this machine"
    assert pid_gone(int(info["pid"]))
    out = tmp_path / "fresh"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {"state.txt": b"step 1", "notice.txt": b"saved on the notice"}
    (run,) = _runs(remote)
    assert run["outcome"] == "preempted" and run["exit_status"] == ExitCode.PREEMPTED
    assert run["preemption"]["cloud"] == "gcp"
    assert [a["status"] for a in run["attempts"]] == [75]
    # Every request carried the header GCP requires, and went to our fake only.
    assert all(r.headers.get("metadata-flavor") == "Google" for r in metadata.requests)


def test_aws_notice_child_that_only_handles_sigterm_is_stopped_before_the_deadline(
    spawn: Callable[..., Running],
    tmp_path: Path,
    ckpt_dir: Path,
    remote: Path,
    metadata: MetadataServer,
) -> None:
    """No checkpoint-signal handler: ckpt says so, snapshots what is there,
    and SIGTERMs the child when the reserve before the deadline is reached
    (a 12 s window keeps a 10 s reserve: the stop comes about 2 s in)."""
    ckpt, info = _start(spawn, tmp_path, ckpt_dir, remote, "ignore", env=_env(metadata, "aws"))

    deadline = metadata.aws_schedule("terminate", in_seconds=12)

    assert ckpt.wait() == ExitCode.PREEMPTED, ckpt.stderr()
    stderr = ckpt.stderr()
    assert "preemption notice: aws terminate" in stderr, stderr
    assert "snapshotting what is on disk" in stderr, stderr
    assert "preemption: stopping the child now" in stderr, stderr
    assert pid_gone(int(info["pid"]))
    out = tmp_path / "fresh"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {"state.txt": b"step 1", "term.txt": b"saved on SIGTERM"}
    (run,) = _runs(remote)
    assert run["preemption"]["deadline"] == pytest.approx(deadline, abs=1.0)
    assert run["ended"] < deadline + 5, "the flush is bounded by the notice's deadline"


def test_child_that_saves_and_exits_0_on_sigterm_after_a_notice_is_still_preempted(
    spawn: Callable[..., Running],
    tmp_path: Path,
    ckpt_dir: Path,
    remote: Path,
    metadata: MetadataServer,
) -> None:
    """Exit 0 after ckpt (or the OS) stopped it does not mean training is done."""
    ckpt, _ = _start(
        spawn, tmp_path, ckpt_dir, remote, "save-go-on", env=_env(metadata), term="exit0"
    )
    assert metadata.wait_gcp_waiting(timeout=30)
    metadata.gcp_preempt()
    wait_for((ckpt_dir / "notice.txt").exists, what="the child's save", proc=ckpt)

    ckpt.signal(signal.SIGTERM)  # the OS shutting the VM down

    assert ckpt.wait() == ExitCode.PREEMPTED, ckpt.stderr()
    out = tmp_path / "fresh"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {
        "state.txt": b"step 1",
        "notice.txt": b"saved on the notice",
        "term.txt": b"saved on SIGTERM",
    }


def test_notice_while_backing_off_ends_the_run_preempted(
    spawn: Callable[..., Running],
    tmp_path: Path,
    ckpt_dir: Path,
    remote: Path,
    metadata: MetadataServer,
) -> None:
    crash = script(tmp_path, "crash.py", "import sys; sys.exit(75)")
    args = run_args(ckpt_dir, remote, "--retries", "5", backoff="600")
    ckpt = spawn([*args, *crash], env=_env(metadata))
    wait_for(lambda: "retry 1/5" in ckpt.stderr(), what="the backoff", proc=ckpt)
    assert metadata.wait_gcp_waiting(timeout=30)

    metadata.gcp_preempt()

    assert ckpt.wait(timeout=60) == ExitCode.PREEMPTED, ckpt.stderr()
    assert "preemption notice while backing off" in ckpt.stderr()
    assert "attempt 2" not in ckpt.stderr()


def test_child_finishing_on_its_own_after_a_notice_exits_0(
    spawn: Callable[..., Running],
    tmp_path: Path,
    ckpt_dir: Path,
    remote: Path,
    metadata: MetadataServer,
) -> None:
    """A notice, then the child completes its work before ckpt stops it (GCP's
    window keeps it running for 15 s): that is success, not preemption."""
    go, ready = tmp_path / "go", tmp_path / "ready"
    body = f"""
        import os, pathlib, time
        pathlib.Path({str(ready)!r}).write_text("")
        while not os.path.exists({str(go)!r}):
            time.sleep(0.02)
        pathlib.Path(os.environ["CKPT_DIR"], "done.txt").write_text("done")
    """
    ckpt = spawn(
        [*run_args(ckpt_dir, remote), *script(tmp_path, "done.py", body)], env=_env(metadata)
    )
    wait_for(ready.exists, what="the child to start", proc=ckpt)
    assert metadata.wait_gcp_waiting(timeout=30)
    metadata.gcp_preempt()
    wait_for(lambda: "the child is stopped in" in ckpt.stderr(), what="the notice", proc=ckpt)

    go.write_text("")

    assert ckpt.wait() == 0, ckpt.stderr()
    (run,) = _runs(remote)
    assert run["outcome"] == "succeeded" and run["preemption"]["cloud"] == "gcp"


def test_a_notice_already_out_at_start_launches_nothing(
    tmp_path: Path, ckpt_dir: Path, remote: Path, metadata: MetadataServer
) -> None:
    metadata.gcp_preempt()
    marker = tmp_path / "launched"
    res = run_ckpt(
        [*run_args(ckpt_dir, remote), PY, "-c", f"open({str(marker)!r}, 'w')"],
        cwd=tmp_path,
        env=_env(metadata),
    )
    assert res.returncode == ExitCode.PREEMPTED, res.stderr
    assert "preemption notice before the launch" in res.stderr, res.stderr
    assert not marker.exists(), "a machine already under notice must not launch the child"
    (run,) = _runs(remote)
    assert run["attempts"] == [] and run["outcome"] == "preempted"


def test_the_oss_sigterm_after_ckpts_own_stop_neither_kills_nor_abandons_the_flush(
    spawn: Callable[..., Running],
    tmp_path: Path,
    ckpt_dir: Path,
    remote: Path,
    metadata: MetadataServer,
) -> None:
    """ckpt stops the child for the notice; the shutdown's SIGTERM comes while
    the child is still saving (it takes 2 s): the save must complete and be
    flushed, not be SIGKILLed as a "second signal" would be."""
    ready = tmp_path / "ready.json"
    body = f"""
        import os, pathlib, signal, sys, time
        d = pathlib.Path(os.environ["CKPT_DIR"])
        def on_term(signum, frame):
            time.sleep(2.0)
            (d / "slow.tmp").write_text("slow save")
            os.replace(d / "slow.tmp", d / "slow.txt")
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        pathlib.Path({str(ready)!r}).write_text(str(os.getpid()))
        while True:
            time.sleep(0.02)
    """
    ckpt = spawn(
        [*run_args(ckpt_dir, remote, "--grace", "60"), *script(tmp_path, "slow.py", body)],
        env=_env(metadata, "aws"),
    )
    wait_for(ready.exists, what="the child to start", proc=ckpt)
    metadata.aws_schedule("terminate", in_seconds=12)
    wait_for(lambda: "stopping the child now" in ckpt.stderr(), what="ckpt's own stop", proc=ckpt)
    # The OS's SIGTERM, past the echo window on purpose: to a plain stop this
    # would be a second signal ("kill now, abandon the flush").
    time.sleep(ECHO_WINDOW + 0.2)
    ckpt.signal(signal.SIGTERM)

    assert ckpt.wait() == ExitCode.PREEMPTED, ckpt.stderr()
    stderr = ckpt.stderr()
    assert "after the preemption notice" in stderr, stderr
    assert "SIGKILL" not in stderr.split("stopping the child now", 1)[1].split("\n", 1)[1], stderr
    out = tmp_path / "fresh"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out).get("slow.txt") == b"slow save"


def test_a_notice_after_a_stop_signal_caps_the_grace(
    spawn: Callable[..., Running],
    tmp_path: Path,
    ckpt_dir: Path,
    remote: Path,
    metadata: MetadataServer,
) -> None:
    """SIGTERM first (GCP sends the shutdown and the notice together), with a
    --grace longer than the window: once the notice lands, the child that
    ignores SIGTERM is killed within a third of the window, not after 600 s."""
    ckpt, info = _start(
        spawn, tmp_path, ckpt_dir, remote, "ignore", "--grace", "600", env=_env(metadata)
    )
    assert metadata.wait_gcp_waiting(timeout=30)
    os.kill(int(info["pid"]), signal.SIGSTOP)  # a child that cannot even save
    ckpt.signal(signal.SIGTERM)
    wait_for(lambda: "SIGKILL in 600s" in ckpt.stderr(), what="the forwarded stop", proc=ckpt)

    metadata.gcp_preempt()

    assert ckpt.wait(timeout=90) == ExitCode.PREEMPTED, ckpt.stderr()
    assert "grace period (--grace): SIGKILL" in ckpt.stderr()
    assert pid_gone(int(info["pid"]))


def test_aws_hibernation_checkpoints_but_does_not_stop_the_job(
    spawn: Callable[..., Running],
    tmp_path: Path,
    ckpt_dir: Path,
    remote: Path,
    metadata: MetadataServer,
) -> None:
    ckpt, info = _start(spawn, tmp_path, ckpt_dir, remote, "save-go-on", env=_env(metadata, "aws"))

    metadata.aws_schedule("hibernate", in_seconds=60)

    wait_for((ckpt_dir / "notice.txt").exists, what="the child's save on the notice", proc=ckpt)
    wait_for(lambda: _durable(remote, "notice.txt"), what="the save to be durable", proc=ckpt)
    assert "frozen with the instance" in ckpt.stderr()
    assert "stopping the child" not in ckpt.stderr()
    ckpt.signal(signal.SIGTERM)  # later, an ordinary stop: 143, not 79
    assert ckpt.wait() == 143, ckpt.stderr()
    assert pid_gone(int(info["pid"]))


def _durable(remote: Path, name: str) -> bool:
    snaps = sorted((remote / "snapshots").glob("*.json")) if (remote / "snapshots").is_dir() else []
    return any(name in {e["path"] for e in json.loads(p.read_text())["entries"]} for p in snaps)


def test_ckpt_attempt_and_ls_continue_across_runs(
    tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    """Run 1 makes two attempts (75, then 0); run 2, as on a new machine, starts
    at attempt 3; `ckpt ls --json` lists both runs and their attempts."""
    body = """
        import os, pathlib, sys
        d = pathlib.Path(os.environ["CKPT_DIR"])
        n = os.environ["CKPT_ATTEMPT"]
        (d / f"attempt-{n}.txt").write_text(n)
        sys.exit(75 if n == "1" else 0)
    """
    cmd = script(tmp_path, "attempts.py", body)
    first = run_ckpt([*run_args(ckpt_dir, remote), *cmd], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_ckpt([*run_args(tmp_path / "elsewhere", remote), *cmd], cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "attempt 3: started" in second.stderr, second.stderr
    assert (tmp_path / "elsewhere" / "attempt-3.txt").read_text() == "3"

    doc = ls_json(remote, cwd=tmp_path)
    runs = doc["runs"]
    assert [[a["number"] for a in r["attempts"]] for r in runs] == [[1, 2], [3]]
    assert [r["outcome"] for r in runs] == ["succeeded", "succeeded"]
    assert all(r["host"] == os.uname().nodename for r in runs)
    assert doc["snapshots"][0]["attempt"] == 3
    text = run_ckpt(["ls", str(remote), "--runs"], cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    runs_table = text.stdout.split("\n\n")[0]  # then a table of the failures
    rows = [line.split() for line in runs_table.splitlines()[1:]]
    assert [(r[0], r[4]) for r in rows] == [(runs[0]["run"], "1-2"), (runs[1]["run"], "3")]


def test_attempt_of_a_run_killed_by_sigkill_still_counts(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    ready = tmp_path / "ready.json"
    cmd = [*script(tmp_path, "trainer.py", TRAINER), str(ready), "ignore"]
    ckpt = spawn([*run_args(ckpt_dir, remote), *cmd])
    wait_for(ready.exists, what="the child to start", proc=ckpt)
    wait_for(lambda: _runs(remote) and _runs(remote)[0]["attempts"], what="the run record")

    ckpt.signal(signal.SIGKILL)
    ckpt.wait()

    body = "import os, sys; print(os.environ['CKPT_ATTEMPT'])"
    res = run_ckpt([*run_args(ckpt_dir, remote), *script(tmp_path, "p.py", body)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "2"


def test_auto_polls_only_when_dmi_names_the_cloud(
    tmp_path: Path, ckpt_dir: Path, remote: Path, metadata: MetadataServer
) -> None:
    body = "print('ran')"
    cmd = [*run_args(ckpt_dir, remote), *script(tmp_path, "p.py", body)]
    env = {"CKPT_METADATA_URL": metadata.url}  # CKPT_PREEMPTION unset: auto

    quiet = run_ckpt(cmd, cwd=tmp_path, env=env)  # the autouse fixture's empty DMI dir
    assert quiet.returncode == 0, quiet.stderr
    assert metadata.requests == [], "auto off a cloud must send nothing"
    assert "preemption:" not in quiet.stderr

    dmi = tmp_path / "dmi"
    dmi.mkdir()
    (dmi / "sys_vendor").write_text("Google\n")
    (dmi / "product_name").write_text("Google Compute Engine\n")
    on_gcp = run_ckpt(cmd, cwd=tmp_path, env={**env, "CKPT_DMI_DIR": str(dmi)})
    assert on_gcp.returncode == 0, on_gcp.stderr
    assert "preemption: watching instance/preempted" in on_gcp.stderr, on_gcp.stderr
    wait_for(lambda: metadata.requests, what="a request to the fake GCP service")


def test_a_failing_metadata_service_is_reported_once_and_the_run_goes_on(
    tmp_path: Path, ckpt_dir: Path, remote: Path, metadata: MetadataServer
) -> None:
    metadata.fail_next(1000, status=500)
    body = "import time; time.sleep(1.5); print('ran')"
    res = run_ckpt(
        [*run_args(ckpt_dir, remote), *script(tmp_path, "p.py", body)],
        cwd=tmp_path,
        env=_env(metadata, "aws"),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ran"
    warnings = [line for line in res.stderr.splitlines() if "preemption notices:" in line]
    assert len(warnings) == 1, res.stderr


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"CKPT_PREEMPTION": "aws-spot"}, "--preemption 'aws-spot'"),
        (
            {"CKPT_PREEMPTION": "gcp", "CKPT_METADATA_URL": "https://127.0.0.1:1"},
            "CKPT_METADATA_URL",
        ),
    ],
    ids=["bad-mode", "bad-url"],
)
def test_bad_preemption_settings_are_one_line_errors(
    tmp_path: Path, ckpt_dir: Path, remote: Path, env: dict[str, str], needle: str
) -> None:
    res = run_ckpt([*run_args(ckpt_dir, remote), PY, "-c", "pass"], cwd=tmp_path, env=env)
    assert res.returncode == ExitCode.CONFIG, res.stderr
    (line,) = error_lines(res.stderr)
    assert needle in line, line
    assert not remote.exists(), "nothing is written on bad input"
