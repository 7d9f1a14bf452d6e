"""ckpt's benchmark suite: every target of the issue, each figure a ratio to a
baseline measured in the same run. Writes OUT/report.md and OUT/chart.png and
prints one PASS/MISS line per target.

    bench/run [options]                  # installs what it needs, then runs this
    /path/to/venv/bin/python bench/run.py [options]   # any venv that has ckpt

Cases (--cases 1,2,...; default all):
  1 first snapshot to a local path vs cp -r, fsspec put (flytekit), rclone sync, tar czf
  2 restore vs cp -r, tar xzf
  3 incremental snapshot (one file rewritten) vs rsync -a; bytes read and written
  4 10,000 small files: first and no-change snapshot vs rsync -a; in-process no-change
  5 push and restore on S3 servers (moto, s3rver), 1 GiB in 10 files and 4 GiB in 2,
    vs rclone copy, aws s3 cp; peak RSS
  6 overhead of ckpt run on a CPU-bound child writing a checkpoint every step, vs
    the bare child and vs its floor (the child + a background cp of each checkpoint)
  7 idle supervisor CPU; ckpt push peak RSS at 1 GiB and 4 GiB
  8 protection lag (rename to durable snapshot) vs cp; commit latency
  9 start-up: ckpt --help, ckpt run -- true vs python -c pass; lazy imports
 10 time to resume: ckpt run -- python -c pass on an empty --dir from S3 vs
    rclone copy alone, and the split of ckpt's time
 11 push and restore right after other large writes (page-cache pressure) vs cp -r;
    per-thread system time, wait channels, /proc/vmstat
 12 overhead at a realistic duty cycle (500 MiB checkpoint per 60 s of compute)
 13 protection lag of atomic saves beside a busy appender vs without it (issue 16)
 14 the first snapshot of 2 GiB of torch zip files with format checks vs without (issue 16)

Statistics: every timed figure is taken over --runs runs (fewer for the slow
baselines and the long cases: --slow-runs, --overhead-runs, --duty-runs), the
tools of a round run back to back in a rotating order, the report lists every
run with its minimum and median, and each target names the statistic it is
judged on: the ratio of minimums (noise only adds time) or, for the long
overhead runs, the median of the per-round paired ratios (_common.py).
"""

import argparse
import datetime
import importlib
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
from _common import BENCH, Bench, Case, Pool, interpreter_of, isolated_env, rmtree

CASES = {
    1: "c1_first_snapshot",
    2: "c2_restore",
    3: "c3_incremental",
    4: "c4_small_files",
    5: "c5_object_store",
    6: "c6_overhead",
    7: "c7_idle_and_memory",
    8: "c8_protection_lag",
    9: "c9_startup",
    10: "c10_time_to_resume",
    11: "c11_cache_pressure",
    12: "c12_duty_cycle",
    13: "c13_appender_lag",
    14: "c14_format_checks",
}

#: Defaults of the full suite (about 40 minutes on 2 cores) and of --quick
#: (about a minute).
FULL = {
    "size_mib": 2048,
    "files": 20,
    "runs": 5,
    "slow_runs": 1,
    "small_files": 10000,
    "s3_sets": "1024x10,4096x2",
    "s3_runs": 3,
    "stores": "s3-moto,s3-s3rver",
    "overhead_mib": 500,
    "overhead_steps": 5,
    "overhead_runs": 3,
    "step_seconds": 3.0,
    "idle_settle": 5.0,
    "idle_seconds": 30.0,
    "rss_mib": "1024,4096",
    "lag_mib": 1024,
    "debounce": 1.0,
    "startup_runs": 10,
    "resume_mib": 1024,
    "resume_files": 10,
    "resume_store": "s3-moto",
    "split_runs": 2,
    "pressure_mib": 4096,
    "pressure_src_mib": 1024,
    "duty_mib": 500,
    "duty_seconds": 60.0,
    "duty_steps": 2,
    "duty_runs": 3,
    "appender_mib": 64,
    "appender_seconds": 20.0,
    "appender_debounce": 0.5,
    "appender_runs": 1,
    "checks_mib": 2048,
    "checks_files": 8,
    "checks_runs": 7,
}
QUICK = {
    **FULL,
    "size_mib": 64,
    "files": 4,
    "runs": 1,
    "small_files": 300,
    "s3_sets": "16x4,32x2",
    "s3_runs": 1,
    "stores": "s3-moto",
    "overhead_mib": 16,
    "overhead_steps": 3,
    "overhead_runs": 1,
    "step_seconds": 0.3,
    "idle_settle": 1.0,
    "idle_seconds": 3.0,
    "rss_mib": "32,128",
    "lag_mib": 32,
    "debounce": 0.5,
    "startup_runs": 3,
    "resume_mib": 16,
    "resume_files": 4,
    "split_runs": 1,
    "pressure_mib": 256,
    "pressure_src_mib": 32,
    "duty_mib": 16,
    "duty_seconds": 1.0,
    "duty_steps": 2,
    "duty_runs": 1,
    "appender_mib": 4,
    "appender_seconds": 2.0,
    "checks_mib": 32,
    "checks_files": 4,
    "checks_runs": 1,
}


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/run.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = ap.add_argument
    add("--cases", default=",".join(map(str, CASES)), help="which cases, e.g. 1,3 (default all)")
    add("--quick", action="store_true", help="tiny sizes: a smoke run of about a minute")
    add("--size-mib", type=int, help="the big set of cases 1-3, in MiB (2048)")
    add("--files", type=int, help="files in the big set (20)")
    add("--runs", type=int, help="timed runs per figure, minimum and median reported (5)")
    add("--slow-runs", type=int, help="runs of the slow baselines: tar czf, tar xzf, aws s3 cp (1)")
    add("--small-files", type=int, help="files in case 4's set (10000)")
    add("--s3-sets", help="case 5's data sets, MiB x files (1024x10,4096x2)")
    add("--s3-runs", type=int, help="case 5's rounds per store and data set (3)")
    add(
        "--stores",
        help="case 5's servers: s3-moto, s3-s3rver, sftp, azure, gcs (s3-moto,s3-s3rver)",
    )
    add("--overhead-mib", type=int, help="case 6's checkpoint size, in MiB (500)")
    add("--overhead-steps", type=int, help="case 6's training steps (5)")
    add("--overhead-runs", type=int, help="case 6's rounds of bare, floor and ckpt (3)")
    add("--step-seconds", type=float, help="case 6's CPU work per step, in seconds (3)")
    add("--idle-settle", type=float, help="case 7: seconds before CPU sampling (5)")
    add("--idle-seconds", type=float, help="case 7: CPU sampling window, seconds (30)")
    add("--rss-mib", help="case 7: the two data sizes for peak RSS, in MiB (1024,4096)")
    add("--lag-mib", type=int, help="case 8's checkpoint size, in MiB (1024)")
    add("--debounce", type=float, help="case 8's --debounce, seconds (1)")
    add("--startup-runs", type=int, help="case 9's runs per command (10)")
    add("--resume-mib", type=int, help="case 10's snapshot on S3, in MiB (1024)")
    add("--resume-files", type=int, help="files in case 10's snapshot (10)")
    add("--resume-store", help="case 10's server (s3-moto)")
    add("--split-runs", type=int, help="case 10's runs under bench/_phases.py (2)")
    add("--pressure-mib", type=int, help="case 11: unrelated data written before each run (4096)")
    add("--pressure-src-mib", type=int, help="case 11's data set, in MiB, 10 files (1024)")
    add("--duty-mib", type=int, help="case 12's checkpoint size, in MiB (500)")
    add("--duty-seconds", type=float, help="case 12's compute per checkpoint, seconds (60)")
    add("--duty-steps", type=int, help="case 12's checkpoints per run (2)")
    add("--duty-runs", type=int, help="case 12's rounds of bare and ckpt (3)")
    add("--appender-mib", type=int, help="case 13's model.pt size, in MiB (64)")
    add("--appender-seconds", type=float, help="case 13: seconds of saves per run (20)")
    add("--appender-debounce", type=float, help="case 13's --debounce, seconds (0.5)")
    add("--appender-runs", type=int, help="case 13's rounds with and without (1)")
    add("--checks-mib", type=int, help="case 14's torch zip files, in MiB in all (2048)")
    add("--checks-files", type=int, help="files in case 14's set (8)")
    add("--checks-runs", type=int, help="case 14's rounds with and without the checks (7)")
    add("--work", type=Path, default=BENCH / "work", help="parent of the temp work dir")
    add("--keep-work", action="store_true", help="do not delete the work dir at the end")
    add(
        "--out",
        type=Path,
        help="where report.md and chart.png go (bench/results; with --quick bench/work/quick)",
    )
    add("--aws", help="the AWS CLI (default: bench/.awscli/bin/aws, $AWS_CLI, aws on PATH)")
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = BENCH / "work" / "quick" if args.quick else BENCH / "results"
    args.rss_mib = [int(x) for x in str(args.rss_mib).split(",")]
    args.slow_runs = min(args.slow_runs, args.runs, args.s3_runs)
    args.case_numbers = [int(x) for x in args.cases.split(",") if x.strip()]
    unknown = [n for n in args.case_numbers if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}: 1-{max(CASES)}")
    if len(args.rss_mib) != 2:
        ap.error("--rss-mib takes two sizes, e.g. 1024,4096")
    return args


def find_tools(args: argparse.Namespace) -> dict[str, str]:
    local_aws = BENCH / ".awscli" / "bin" / "aws"
    aws = args.aws or os.environ.get("AWS_CLI") or ""
    if not aws:
        aws = str(local_aws) if local_aws.exists() else shutil.which("aws") or ""
    return {"rclone": shutil.which("rclone") or "", "aws": aws}


#: Where ckpt's two packages are, printed by ckpt's interpreter.
PACKAGE_DIRS = (
    "import os, ckpt, ckpt_cli\nfor m in (ckpt, ckpt_cli): print(os.path.dirname(m.__file__))"
)


def precompile(b: Bench) -> None:
    """Byte-compile ckpt's packages, as pip does when it installs them. An
    editable install (the repository's own .venv) has no .pyc files until a
    run writes them, and with PYTHONDONTWRITEBYTECODE=1 (set on these
    machines) none is ever written: every ckpt process would compile its
    modules again (about 0.14 s of CPU per process, findings.md), a cost no
    user of an installed ckpt pays."""
    dirs = b.capture([b.python, "-c", PACKAGE_DIRS]).split()
    b.capture([b.python, "-m", "compileall", "-q", *dirs])


def main(argv: list[str]) -> int:
    args = parse(argv)
    ckpt = Path(sys.executable).parent / "ckpt"
    if not ckpt.exists():
        sys.exit(f"bench: {ckpt} does not exist: run this with the Python of a venv that has ckpt")
    for tool in ("cp", "tar", "gzip", "rsync"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is not installed (bash bench/install.sh)")
    # Safety for this process too (case 5 starts servers and imports ckpt_cli).
    os.environ.update(AWS_EC2_METADATA_DISABLED="true", NO_GCE_CHECK="true")

    args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.work)).resolve()
    started = datetime.datetime.now().astimezone()
    t0 = time.monotonic()
    b = Bench(
        args=args,
        work=work,
        env=isolated_env(work),
        ckpt=str(ckpt),
        python=interpreter_of(str(ckpt)),
        tools=find_tools(args),
        pool=Pool(work / "pool"),
    )
    b.shared["rss_floor"] = b.run(["true"]).rss  # what ru_maxrss reads at the least
    precompile(b)
    facts = report.machine(b, started)
    command = "bench/run.py " + shlex.join(argv) if argv else "bench/run.py"
    print(f"bench: work dir {work}", flush=True)
    cases: list[Case] = []
    try:
        for n in args.case_numbers:
            module = importlib.import_module(f"cases.{CASES[n]}")
            print(f"== case {n}: {module.TITLE}", flush=True)
            c0 = time.monotonic()
            try:
                case = module.run(b)
            except Exception:
                case = Case(n, module.TITLE, error=traceback.format_exc())
                print(f"   ERROR in case {n}:\n{case.error}", flush=True)
            case.seconds = time.monotonic() - c0
            case.load = os.getloadavg()
            for t in case.targets:
                print(f"   {t.line()}", flush=True)
            if max(case.load) > report.BUSY * (os.cpu_count() or 1):
                load = ", ".join(f"{x:.1f}" for x in case.load)
                print(f"   (the machine was busy: load average {load})", flush=True)
            print(f"   (case {n} took {case.seconds:.0f} s)", flush=True)
            cases.append(case)
            # Free the disk and page cache a case used (case 2 restores case 1's repository).
            if n != 1 or 2 not in args.case_numbers:
                rmtree(work / f"c{n}")
            if n == 2:
                rmtree(work / "c1")
    finally:
        if args.keep_work:
            print(f"bench: work dir kept: {work}")
        else:
            rmtree(work)
    seconds = time.monotonic() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    text = report.markdown(b, cases, facts, command, seconds)
    (args.out / "report.md").write_text(text)
    targets = [t for c in cases for t in c.targets]
    passed = sum(t.passed for t in targets)
    title = f"ckpt benchmark: {passed} of {len(targets)} targets PASS ({started:%Y-%m-%d})"
    if targets:
        report.chart(targets, args.out / "chart.png", title)
    errors = [c.number for c in cases if c.error]
    failed = f"; case(s) {errors} FAILED" if errors else ""
    print(
        f"bench: {passed} of {len(targets)} targets PASS{failed}; {seconds / 60:.1f} min; "
        f"report {args.out / 'report.md'}, chart {args.out / 'chart.png'}"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
