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
  5 first snapshot and restore to the S3 test server vs rclone copy, aws s3 cp
  6 overhead of ckpt run on a CPU-bound child writing a checkpoint every step
  7 idle supervisor CPU; ckpt push peak RSS at 1 GiB and 4 GiB
  8 protection lag (rename to durable snapshot) vs cp; commit latency
  9 start-up: ckpt --help, ckpt run -- true vs python -c pass; lazy imports
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
}

#: Defaults of the full suite (about 10 minutes on 2 cores) and of --quick.
FULL = {
    "size_mib": 2048,
    "files": 20,
    "runs": 3,
    "slow_runs": 1,
    "small_files": 10000,
    "s3_size_mib": 1024,
    "s3_files": 10,
    "stores": "s3-moto",
    "overhead_mib": 500,
    "overhead_steps": 5,
    "step_seconds": 3.0,
    "idle_settle": 5.0,
    "idle_seconds": 30.0,
    "rss_mib": "1024,4096",
    "lag_mib": 1024,
    "debounce": 1.0,
    "startup_runs": 10,
}
QUICK = {
    **FULL,
    "size_mib": 64,
    "files": 4,
    "runs": 1,
    "small_files": 300,
    "s3_size_mib": 32,
    "s3_files": 4,
    "overhead_mib": 16,
    "overhead_steps": 3,
    "step_seconds": 0.3,
    "idle_settle": 1.0,
    "idle_seconds": 3.0,
    "rss_mib": "32,128",
    "lag_mib": 32,
    "debounce": 0.5,
    "startup_runs": 3,
}


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/run.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = ap.add_argument
    add("--cases", default="1,2,3,4,5,6,7,8,9", help="which cases, e.g. 1,3 (default all)")
    add("--quick", action="store_true", help="tiny sizes: a smoke run in well under a minute")
    add("--size-mib", type=int, help="the big set of cases 1-3, in MiB (2048)")
    add("--files", type=int, help="files in the big set (20)")
    add("--runs", type=int, help="timed runs per figure; the median is used (3)")
    add("--slow-runs", type=int, help="runs of the slow baselines: tar czf, tar xzf, aws s3 cp (1)")
    add("--small-files", type=int, help="files in case 4's set (10000)")
    add("--s3-size-mib", type=int, help="case 5's data, in MiB (1024)")
    add("--s3-files", type=int, help="files in case 5's data (10)")
    add("--stores", help="case 5's servers: s3-moto, s3-s3rver, sftp, azure, gcs (s3-moto)")
    add("--overhead-mib", type=int, help="case 6's checkpoint size, in MiB (500)")
    add("--overhead-steps", type=int, help="case 6's training steps (5)")
    add("--step-seconds", type=float, help="case 6's CPU work per step, in seconds (3)")
    add("--idle-settle", type=float, help="case 7: seconds before CPU sampling (5)")
    add("--idle-seconds", type=float, help="case 7: CPU sampling window, seconds (30)")
    add("--rss-mib", help="case 7: the two data sizes for peak RSS, in MiB (1024,4096)")
    add("--lag-mib", type=int, help="case 8's checkpoint size, in MiB (1024)")
    add("--debounce", type=float, help="case 8's --debounce, seconds (1)")
    add("--startup-runs", type=int, help="case 9's runs per command (10)")
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
    args.slow_runs = min(args.slow_runs, args.runs)
    args.case_numbers = [int(x) for x in args.cases.split(",") if x.strip()]
    unknown = [n for n in args.case_numbers if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}: 1-9")
    if len(args.rss_mib) != 2:
        ap.error("--rss-mib takes two sizes, e.g. 1024,4096")
    return args


def find_tools(args: argparse.Namespace) -> dict[str, str]:
    local_aws = BENCH / ".awscli" / "bin" / "aws"
    aws = args.aws or os.environ.get("AWS_CLI") or ""
    if not aws:
        aws = str(local_aws) if local_aws.exists() else shutil.which("aws") or ""
    return {"rclone": shutil.which("rclone") or "", "aws": aws}


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
