"""What every benchmark case shares: timing whole processes, random data sets,
the environment the tools run in, and the results a case hands to the report.

Standard library only (matplotlib is imported by bench/report.py, and only
when the chart is drawn).
"""

import contextlib
import dataclasses
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

MiB = 1 << 20
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
#: Written by os.urandom in blocks of this size.
BLOCK = 16 * MiB


# ---------------------------------------------------------------- processes


@dataclasses.dataclass
class Proc:
    """One finished process: wall time and what the kernel accounted for it."""

    argv: list[str]
    seconds: float
    #: ru_maxrss from wait4, in bytes: the largest RSS of the process or of any
    #: child it reaped (Linux folds reaped children's peak into it); at least
    #: the launcher's own few MiB (bench/_launch.py).
    rss: int
    status: int
    #: /proc/PID/io of the exited process (read before it is reaped): every byte
    #: it and its reaped children passed to read()/write()-like calls.
    rchar: int = 0
    wchar: int = 0
    #: VmHWM of the process itself (not its children), polled while it ran.
    hwm: int | None = None
    stderr: str = ""
    #: time.time() just before the fork: puts the command's own timestamps
    #: (ckpt's --log-json events) on the launcher's time line.
    wall0: float = 0.0
    #: ru_utime and ru_stime from wait4: CPU seconds of the process and of
    #: the children it reaped.
    utime: float = 0.0
    stime: float = 0.0


class ProcError(RuntimeError):
    pass


LAUNCHER = BENCH / "_launch.py"


def _vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: dict[str, str],
    cwd: Path,
    hwm: bool = False,
    check: bool = True,
    stdout: Any = subprocess.DEVNULL,
    started: Callable[[int], None] | None = None,
) -> Proc:
    """Run argv to its end and account for it as a whole process.

    bench/_launch.py (a small process of its own: see there why) forks and
    execs argv and reports the wall time from before the fork to the exit
    (waitid with WNOWAIT), /proc/PID/io read then, before the reap, and
    ru_maxrss from wait4. `hwm=True` also polls the command's own VmHWM
    every 0.2 s. `started(pid)` is called once the command runs (in this
    thread: it must return at once, or start a thread)."""
    args = [os.fspath(a) for a in argv]
    r, w = os.pipe()
    with tempfile.TemporaryFile(dir=cwd) as err:
        try:
            launcher = subprocess.Popen(
                [sys.executable, "-I", "-S", str(LAUNCHER), str(w), *args],
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=err,
                pass_fds=(w,),
            )
        finally:
            os.close(w)
        peak: list[int] = []
        done = threading.Event()
        poller = None
        with os.fdopen(r) as report:
            line = report.readline()
            if line:
                pid = int(line)
                if hwm:

                    def poll() -> None:
                        while not done.wait(0.2):
                            value = _vm_hwm(pid)
                            if value is not None:
                                peak.append(value)

                    poller = threading.Thread(target=poll, daemon=True)
                    poller.start()
                if started is not None:
                    started(pid)
                line = report.readline()
        done.set()
        launcher.wait()
        if poller is not None:
            poller.join()
        err.seek(0)
        text = err.read().decode(errors="replace")
    if not line:
        raise ProcError(f"the bench launcher failed on `{' '.join(args)}`:\n{text[-3000:]}")
    res = json.loads(line)
    result = Proc(
        args,
        res["seconds"],
        res["maxrss_kib"] * 1024,
        res["status"],
        res["rchar"],
        res["wchar"],
        max(peak, default=None),
        text,
        res["wall0"],
        res["utime"],
        res["stime"],
    )
    if check and result.status != 0:
        raise ProcError(f"`{' '.join(args)}` exited {result.status}:\n{text[-3000:]}")
    return result


def output(argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    """stdout+stderr of a short command, stripped; '' if it cannot run."""
    try:
        done = subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def sync() -> None:
    """Flush dirty pages so one run's writeback does not land in the next."""
    os.sync()


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def seconds_of(procs: Sequence[Proc]) -> float:
    """The median wall time of the runs."""
    return median(p.seconds for p in procs)


def min_of(procs: Sequence[Proc]) -> float:
    """The shortest wall time of the runs: noise on a shared machine only ever
    adds time, so the minimum is the run the neighbours disturbed least."""
    return min(p.seconds for p in procs)


def paired(ours: Sequence[Proc], base: Sequence[Proc]) -> list[float]:
    """ours[i] / base[i]: each run over the baseline run of the same round
    (the two ran back to back, so a noisy neighbour hit both alike)."""
    return [a.seconds / b.seconds for a, b in zip(ours, base, strict=False)]


# ---------------------------------------------------------------- statistics
#
# Every timed figure is taken over several runs (--runs), the tools of one
# round run back to back in an order that rotates from round to round, and the
# report lists every run with its minimum and median. A target is judged on
# one of two statistics, named in the target's "how" column:
#
# - MIN: the ratio of minimums, min(ckpt) / min(baseline). Noise on a shared
#   machine only adds time, so each minimum is the least disturbed run; one
#   slow run (a neighbour's burst) cannot move it. The default.
# - PAIRED: the median of the per-round ratios ckpt[i] / baseline[i]. For
#   long runs whose difference is a few percent (the overhead cases): a
#   neighbour's load that lasts minutes hits both runs of a round, and the
#   median drops the odd round.
#
# Both are printed for every pair of series (ratio_table), whichever judges.
MIN = "ratio of minimums"
PAIRED = "median of per-round paired ratios"


def judged(ours: Sequence[Proc], base: Sequence[Proc], rule: str = MIN) -> float:
    """The statistic a target is judged on (MIN or PAIRED)."""
    if rule == PAIRED:
        return median(paired(ours, base))
    return min_of(ours) / min_of(base)


def how(rule: str, ours: str, base: str) -> str:
    """The text of a target's "how" column for a ratio judged by rule."""
    if rule == PAIRED:
        return f"{PAIRED}: median over the rounds of ({ours}) / ({base}) of the same round"
    return f"{MIN}: fastest run of {ours} over fastest run of {base}"


def rotate(names: list[str], r: int) -> list[str]:
    """The r-th rotation: every tool goes first in turn, so drift is shared."""
    k = r % len(names)
    return names[k:] + names[:k]


# ---------------------------------------------------------------- data


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, BLOCK)
            f.write(os.urandom(n))
            left -= n


def warm(path: Path) -> int:
    """Read every file under path once (into the page cache); bytes read."""
    total = 0
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(BLOCK):
                total += len(chunk)
    return total


def tree_size(path: Path) -> tuple[int, int]:
    """(files, bytes) of the regular files under path."""
    files = [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    return len(files), sum(p.stat().st_size for p in files)


def same_tree(a: Path, b: Path, *, content: bool = False) -> bool:
    """The same relative file names and sizes (and bytes, with content=True)."""
    names_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    names_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if names_a != names_b:
        return False
    for rel in names_a:
        if (a / rel).stat().st_size != (b / rel).stat().st_size:
            return False
        if content and not _same_bytes(a / rel, b / rel):
            return False
    return True


def _same_bytes(x: Path, y: Path) -> bool:
    with open(x, "rb") as f, open(y, "rb") as g:
        while True:
            u, v = f.read(BLOCK), g.read(BLOCK)
            if u != v:
                return False
            if not u:
                return True


# ---------------------------------------------------------------- ckpt's events

#: The end of a child that waits for ckpt (its names `events`, `t` and `n`
#: set before, json, sys and time imported): exits 0 once the --log-json file
#: `events` holds a snapshot taken at or after time.time() `t` of at least `n`
#: files, 1 after 600 s.
WAIT_FOR_SNAPSHOT = r"""
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    with open(events) as f:
        for line in f:
            e = json.loads(line)
            if e["event"] == "snapshot" and e["ts"] >= t - 0.002 and e["files"] >= n:
                sys.exit(0)
    time.sleep(0.02)
sys.exit(1)
"""


def first_snapshot_after(events: Path, t: float, files: int = 1) -> dict[str, Any]:
    """The first snapshot event in the --log-json file taken at or after
    time.time() t that holds at least `files` files (WAIT_FOR_SNAPSHOT's)."""
    with open(events) as f:
        log = [json.loads(line) for line in f if line.strip()]
    for e in log:
        if e["event"] == "snapshot" and e["ts"] >= t - 0.002 and e["files"] >= files:
            return dict(e)
    raise RuntimeError(f"no snapshot event of {files}+ files after {t:.3f} in {events}")


def rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class Pool:
    """Random files generated once per bench run and hard-linked into data
    sets, so sets of the same file size share their files (a 4 GiB set holds
    the 2 GiB set's files plus new ones) and nothing is generated twice.
    Replacing a file of a set by temp + rename never touches the pool."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def file(self, size: int, index: int) -> Path:
        path = self.root / str(size) / f"{index:04d}.bin"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".partial")
            write_random(tmp, size)
            tmp.rename(path)
        return path

    def dataset(self, where: Path, total: int, files: int) -> Path:
        """where/ with `files` files of total // files random bytes each."""
        per = total // files
        if where.exists():
            rmtree(where)
        where.mkdir(parents=True)
        for i in range(files):
            os.link(self.file(per, i), where / f"shard-{i:02d}.bin")
        return where


def small_files(where: Path, count: int, seed: int = 6) -> int:
    """`count` files of 1-64 KiB random bytes spread over 8 subdirectories; bytes."""
    rng = random.Random(seed)
    sizes = [rng.randint(1024, 64 * 1024) for _ in range(count)]
    where.mkdir(parents=True)
    subdirs = [where / f"part-{k}" for k in range(8)]
    for d in subdirs:
        d.mkdir()
    blob = os.urandom(sum(sizes))
    offset = 0
    for i, size in enumerate(sizes):
        (subdirs[i % len(subdirs)] / f"f{i:05d}.bin").write_bytes(blob[offset : offset + size])
        offset += size
    return offset


# ---------------------------------------------------------------- results


@dataclasses.dataclass
class Target:
    """One figure of the issue's list and its limit: PASS or MISS."""

    label: str  # what is compared, e.g. "ckpt push / cp -r"
    value: float
    op: str  # "<=", "<", ">=", "=="
    limit: float
    unit: str  # "x" (a ratio), "s", "%", "MiB", "" (a count)
    rule: str = ""  # how the value is computed, for the report
    case: int = 0

    @property
    def passed(self) -> bool:
        if self.op == "<=":
            return self.value <= self.limit
        if self.op == "<":
            return self.value < self.limit
        if self.op == ">=":
            return self.value >= self.limit
        return self.value == self.limit

    def fmt(self, value: float) -> str:
        """value in the target's unit; with the digits it takes to tell it
        from the limit where the usual ones round it onto the limit (0.998 %
        against < 1.00 % reads "0.998 %", not a PASS of "1.00 %")."""
        shown = self._fmt(value, 0)
        extra = 0
        while value != self.limit and shown == self._fmt(self.limit, extra) and extra < 4:
            extra += 1
            shown = self._fmt(value, extra)
        return shown

    def _fmt(self, value: float, extra: int) -> str:
        if self.unit == "x":
            return f"{value:.{2 + extra}f}x"
        if self.unit == "s":
            return f"{value:.{3 + extra}f} s"
        if self.unit == "%":
            return f"{value:.{2 + extra}f} %"
        if self.unit == "MiB":
            return f"{value:.{extra}f} MiB"
        return f"{value:g}"

    @property
    def wanted(self) -> str:
        return f"{self.op} {self.fmt(self.limit)}"

    def line(self) -> str:
        verdict = "PASS" if self.passed else "MISS"
        measured = self.fmt(self.value)
        return f"{verdict}  case {self.case}: {self.label} = {measured} (target {self.wanted})"


@dataclasses.dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    title: str = ""


@dataclasses.dataclass
class Case:
    """What one case hands to the report."""

    number: int
    title: str
    method: list[str] = dataclasses.field(default_factory=list)  # paragraphs
    tables: list[Table] = dataclasses.field(default_factory=list)
    targets: list[Target] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    #: Durability (fsync or not) and page-cache state, one sentence.
    conditions: str = ""
    seconds: float = 0.0
    #: The load average when the case ended (the machine may be shared).
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    error: str | None = None

    def target(self, *args: Any, **kwargs: Any) -> Target:
        t = Target(*args, **kwargs, case=self.number)
        self.targets.append(t)
        return t


def mib(n: float) -> str:
    return f"{n / MiB:.1f}"


def timing_table(
    series: dict[str, list[Proc]],
    *,
    size: int | None = None,
    io: bool = False,
    cpu: bool = False,
    title: str = "",
) -> Table:
    """One row per tool: minimum and median wall time, every run (in the order
    they ran), throughput of the fastest run, peak RSS; with cpu, the median
    user and system CPU seconds (wait4: the process and its reaped children)."""
    headers = ["tool", "min s", "median s", "runs (s)"]
    if size:
        headers.append("MiB/s (min)")
    headers.append("peak RSS MiB")
    if cpu:
        headers += ["user s", "sys s"]
    if io:
        headers += ["rchar MiB", "wchar MiB"]
    rows = []
    for name, procs in series.items():
        if not procs:
            continue
        row = [
            name,
            f"{min_of(procs):.3f}",
            f"{seconds_of(procs):.3f}",
            ", ".join(f"{p.seconds:.3f}" for p in procs),
        ]
        if size:
            row.append(f"{size / MiB / min_of(procs):.0f}")
        row.append(mib(max(p.rss for p in procs)))
        if cpu:
            row.append(f"{median(p.utime for p in procs):.2f}")
            row.append(f"{median(p.stime for p in procs):.2f}")
        if io:
            row.append(mib(median(p.rchar for p in procs)))
            row.append(mib(median(p.wchar for p in procs)))
        rows.append(row)
    return Table(headers, rows, title)


def ratio_table(series: dict[str, list[Proc]], ours: str, title: str = "") -> Table:
    """ckpt against each baseline by every statistic (< 1: ckpt is faster):
    the ratio of minimums, of medians, and the median of the per-round ratios
    with each round's spread."""
    mine = series[ours]
    rows = []
    for name, procs in series.items():
        if name == ours or not procs:
            continue
        pairs = paired(mine, procs)
        rows.append(
            [
                f"{ours} / {name}",
                f"{min_of(mine) / min_of(procs):.3f}",
                f"{seconds_of(mine) / seconds_of(procs):.3f}",
                f"{median(pairs):.3f}" if pairs else "",
                ", ".join(f"{x:.2f}" for x in pairs),
            ]
        )
    return Table(
        [
            "ckpt / baseline",
            "ratio of minimums",
            "ratio of medians",
            "median paired ratio",
            "per-round ratios",
        ],
        rows,
        title,
    )


# ---------------------------------------------------------------- the bench run


@dataclasses.dataclass
class Bench:
    """The settings and shared state of one bench run, handed to every case."""

    args: Any  # the parsed options of run.py (sizes already resolved)
    work: Path  # a fresh temp dir, deleted at the end
    env: dict[str, str]  # what every tool runs with (HOME etc. inside work)
    ckpt: str  # the ckpt console script
    python: str  # the interpreter that runs ckpt (its shebang)
    tools: dict[str, str]  # rclone, aws: paths ('' if missing)
    pool: Pool
    #: Left by one case for a later one (case 1's repository for case 2, ...).
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)

    def dir(self, *parts: str) -> Path:
        """A fresh, empty directory under the work dir."""
        path = self.work.joinpath(*parts)
        rmtree(path)
        path.mkdir(parents=True)
        return path

    def run(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> Proc:
        kw.setdefault("env", self.env)
        kw.setdefault("cwd", self.work)
        return run(argv, **kw)

    def capture(self, argv: Sequence[str | os.PathLike[str]]) -> str:
        """stdout of a command that must succeed (not timed)."""
        done = subprocess.run(
            [os.fspath(x) for x in argv],
            env=self.env,
            cwd=self.work,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if done.returncode != 0:
            raise ProcError(
                f"`{' '.join(map(str, argv))}` exited {done.returncode}:\n{done.stderr}"
            )
        return done.stdout

    def ckpt_run(
        self, d: Path, remote: Path, *flags: str | os.PathLike[str], command: Sequence[Any]
    ) -> list[Any]:
        """`ckpt run -q --retries 0 --preemption off --dir D --remote R FLAGS -- COMMAND`."""
        base = [self.ckpt, "run", "-q", "--retries", "0", "--preemption", "off"]
        return [*base, "--dir", d, "--remote", remote, *flags, "--", *command]

    def big_set(self) -> Path:
        """Case 1's data set (--size-mib in --files files), shared by cases 1-3."""
        where = self.work / "data" / "big"
        if "big" not in self.shared:
            a = self.args
            self.pool.dataset(where, a.size_mib * MiB, a.files)
            self.shared["big"] = where
        return where


def isolated_env(work: Path) -> dict[str, str]:
    """The environment of every tool: config, caches and credentials only in
    the work dir (never the user's ~/.aws, rclone.conf or ckpt store), no
    cloud metadata lookups, no proxy for 127.0.0.1, no CKPT_* from outside."""
    home = work / "home"
    runtime = work / "run"
    for d in (home, runtime):
        d.mkdir(parents=True, exist_ok=True)
    runtime.chmod(0o700)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CKPT_", "AWS_", "RCLONE_", "FSSPEC_", "GOOGLE_", "AZURE_"))
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    }
    env.update(
        HOME=str(home),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_STATE_HOME=str(home / ".local" / "state"),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_RUNTIME_DIR=str(runtime),
        RCLONE_CONFIG=str(work / "rclone.conf"),
        AWS_CONFIG_FILE=str(work / "aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(work / "aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        NO_GCE_CHECK="true",
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    (work / "rclone.conf").touch()
    (work / "aws-config").write_text("[default]\nregion = us-east-1\n")
    (work / "aws-credentials").touch()
    return env


def interpreter_of(script: str) -> str:
    """The Python a console script runs with (its #! line), else this one."""
    try:
        with open(script, "rb") as f:
            first = f.readline().decode().strip()
    except OSError:
        return sys.executable
    if first.startswith("#!") and "python" in first:
        return first[2:].strip().split()[0]
    return sys.executable
