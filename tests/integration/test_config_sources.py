"""`ckpt run` settings from flags, CKPT_* env vars, ckpt.toml and [tool.ckpt] in
pyproject.toml, through the real binary: precedence, `--print-config`, one-line
errors for bad files and values, and a real run configured by ckpt.toml."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest

from ckpt._contract import ExitCode
from ckpt_cli.config import OPTIONS

from ._util import PY, error_lines, manifest_paths, run_ckpt, script

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def _no_ckpt_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the env vars a test sets may configure ckpt (not the developer's shell)."""
    for opt in OPTIONS:
        if opt.env_var:
            monkeypatch.delenv(opt.env_var, raising=False)


def print_config(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[dict[str, object], dict[str, str]]:
    """Run `ckpt run --print-config`; return (values, sources) by file key."""
    res = run_ckpt(["run", "--print-config", *args], cwd=cwd, env=env)
    assert res.returncode == 0, res.stderr
    values = tomllib.loads(res.stdout)  # the output is TOML: it can become a ckpt.toml
    sources = {}
    for line in res.stdout.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-z-]+) = .*?  # (.+)", line)
        assert m, f"not a `key = value  # source` line: {line!r}"
        sources[m.group(1)] = m.group(2)
    assert set(sources) == set(values) == {opt.file_key for opt in OPTIONS}
    return values, sources


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    (tmp_path / "ckpt.toml").write_text(
        "retries = 5\nkeep = 4\ndebounce = 0.5\nexclude = ['*.log']\n"
        'backoff = "2:8"\nno-restore = true\n'
    )
    env = {"CKPT_KEEP": "6", "CKPT_DEBOUNCE": "0.7", "CKPT_EXCLUDE": "a,b"}
    values, sources = print_config(
        tmp_path, "--debounce", "0.9", "--exclude", "c", "--", "python", "t.py", env=env
    )
    assert (values["retries"], sources["retries"]) == (5, "ckpt.toml")
    assert (values["backoff"], sources["backoff"]) == ("2:8", "ckpt.toml")
    assert (values["no-restore"], sources["no-restore"]) == (True, "ckpt.toml")
    assert (values["keep"], sources["keep"]) == (6, "env CKPT_KEEP")
    assert (values["debounce"], sources["debounce"]) == (0.9, "flag")
    assert (values["exclude"], sources["exclude"]) == (["c"], "flag")
    assert (values["grace"], sources["grace"]) == (30.0, "default")
    assert (values["command"], sources["command"]) == (["python", "t.py"], "flag")
    assert sources["remote"].startswith("default: the embedded store ")


def test_print_config_runs_nothing_and_touches_no_remote(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    res = run_ckpt(
        ["run", "--print-config", "--", PY, "-c", f"open({str(marker)!r}, 'w')"], cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert not marker.exists()
    assert not (tmp_path / "checkpoints").exists()
    assert not (Path(os.environ["XDG_DATA_HOME"]) / "ckpt").exists()
    assert res.stderr == ""


def test_pyproject_tool_ckpt_and_ckpt_toml_wins(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "train"\n\n[tool.ckpt]\nretries = 8\ngrace = 5\n'
    )
    values, sources = print_config(tmp_path)
    assert (values["retries"], sources["retries"]) == (8, "pyproject.toml [tool.ckpt]")
    assert (values["grace"], sources["grace"]) == (5.0, "pyproject.toml [tool.ckpt]")

    (tmp_path / "ckpt.toml").write_text("retries = 1\n")
    res = run_ckpt(["run", "--print-config"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    values, sources = print_config(tmp_path)
    assert (values["retries"], sources["retries"]) == (1, "ckpt.toml")
    assert sources["grace"] == "default", "the two files are not merged"
    notes = [line for line in res.stderr.splitlines() if "ignored" in line]
    assert notes == ["ckpt: ckpt.toml is used; [tool.ckpt] in pyproject.toml is ignored"]


def test_print_config_hides_secrets(tmp_path: Path) -> None:
    (tmp_path / "ckpt.toml").write_text(
        '[storage_options]\nsecret = "fromthefile-s3cr3t"\nanon = false\n'
    )
    values, sources = print_config(tmp_path)
    assert values["storage-options"] == {"secret": "***", "anon": False}
    assert sources["storage-options"] == "ckpt.toml"

    env = {"CKPT_STORAGE_OPTIONS": json.dumps({"key": "AKIAFROMENV", "token": "tok-from-env"})}
    res = run_ckpt(["run", "--print-config", "-o", "password=flag-pa55word"], cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    for secret in ("fromthefile-s3cr3t", "AKIAFROMENV", "tok-from-env", "flag-pa55word"):
        assert secret not in res.stdout + res.stderr
    values, sources = print_config(tmp_path, env=env)
    assert values["storage-options"] == {"key": "***", "token": "***"}
    assert sources["storage-options"] == "env CKPT_STORAGE_OPTIONS"


@pytest.mark.parametrize(
    ("toml", "env", "needle"),
    [
        ("retires = 3\n", {}, "ckpt.toml: unknown key 'retires' (did you mean 'retries'"),
        ('retries = "x"\n', {}, "ckpt.toml: retries = 'x' is not an integer"),
        ("debounce = [1]\n", {}, "ckpt.toml: debounce = [1] is not a number"),
        ('preemption = "aws-spot"\n', {}, "ckpt.toml: --preemption 'aws-spot'"),
        ("keep = 2\nretries = [\n", {}, "ckpt.toml is not valid TOML"),
        ("", {"CKPT_RETRIES": "x"}, "CKPT_RETRIES='x' is not an integer"),
        ("", {"CKPT_BACKOFF": "soon"}, "CKPT_BACKOFF: --backoff 'soon'"),
    ],
    ids=["unknown-key", "type", "list-for-number", "bad-value", "syntax", "env", "env-value"],
)
def test_bad_settings_are_one_line_errors(
    tmp_path: Path, toml: str, env: dict[str, str], needle: str
) -> None:
    (tmp_path / "ckpt.toml").write_text(toml)
    marker = tmp_path / "ran"
    for extra in (["--print-config"], []):
        res = run_ckpt(
            ["run", *extra, "--", PY, "-c", f"open({str(marker)!r}, 'w')"], cwd=tmp_path, env=env
        )
        assert res.returncode == ExitCode.CONFIG, res.stderr
        (line,) = error_lines(res.stderr)
        assert needle in line, line
        assert res.stderr.strip() == line, "one line, nothing else"
    assert not marker.exists()


def test_pyproject_errors_name_the_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.ckpt]\nkeep = true\n")
    res = run_ckpt(["run", "--", PY, "-c", "pass"], cwd=tmp_path)
    assert res.returncode == ExitCode.CONFIG
    (line,) = error_lines(res.stderr)
    assert "pyproject.toml [tool.ckpt]: keep = True is not an integer" in line


def test_no_command_anywhere(tmp_path: Path) -> None:
    res = run_ckpt(["run"], cwd=tmp_path)
    assert res.returncode == ExitCode.USAGE
    (line,) = error_lines(res.stderr)
    assert "no command to run" in line


#: Writes a file into CKPT_DIR, waits up to argv[3] seconds for a new snapshot
#: manifest in the remote argv[2], appends "ATTEMPT snapshot|none" to argv[1],
#: and asks for a retry (exit 75).
PROBE = """
    import os, sys, time
    from pathlib import Path
    log, snaps, wait = Path(sys.argv[1]), Path(sys.argv[2]) / "snapshots", float(sys.argv[3])
    d = Path(os.environ["CKPT_DIR"])
    attempt = os.environ["CKPT_ATTEMPT"]
    (d / f"state-{attempt}.tmp").write_text(attempt)
    os.replace(d / f"state-{attempt}.tmp", d / f"state-{attempt}")
    before = set(snaps.glob("*.json"))
    end = time.monotonic() + wait
    seen = False
    while not seen and time.monotonic() < end:
        seen = bool(set(snaps.glob("*.json")) - before)
        time.sleep(0.05)
    with open(log, "a") as f:
        f.write(f"{attempt} {'snapshot' if seen else 'none'}\\n")
    sys.exit(75)
"""


def test_a_run_takes_retries_and_debounce_from_ckpt_toml(tmp_path: Path) -> None:
    """retries = 1 -> exactly two launches; debounce = 60 -> no snapshot while
    the child runs (the default, 2 s, would take one), only the final one."""
    remote, log = tmp_path / "remote", tmp_path / "launches.log"
    (tmp_path / "ckpt.toml").write_text(
        f'retries = 1\ndebounce = 60\nbackoff = "0"\nremote = "{remote}"\ndir = "ck"\n'
    )
    probe = script(tmp_path, "probe.py", PROBE)
    res = run_ckpt(["run", "--", *probe, str(log), str(remote), "4"], cwd=tmp_path)
    assert res.returncode == 75, res.stderr
    assert log.read_text().splitlines() == ["1 none", "2 none"]
    assert manifest_paths(remote), "the final snapshot after each exit is still taken"
    assert (tmp_path / "ck" / "state-2").exists()

    # A flag beats the file: with --debounce 0.2 the child sees a snapshot.
    log.unlink()
    res = run_ckpt(
        ["run", "--debounce", "0.2", "--retries", "0", "--", *probe, str(log), str(remote), "30"],
        cwd=tmp_path,
    )
    assert res.returncode == 75, res.stderr
    assert log.read_text().splitlines() == ["3 snapshot"]
