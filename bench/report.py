"""The report of a bench run: the machine, the method, one section per case,
the summary of every target (markdown), and the chart (PNG, matplotlib)."""

import datetime
import os
import platform
import sys
import textwrap
from pathlib import Path

from _common import ROOT, Bench, Case, Table, Target, output

METHOD = """\
- **Same data on both sides.** Every case generates its data once with `os.urandom`
  (nothing compresses) and hands the very same files to ckpt and to each baseline.
- **Whole processes.** Every tool runs as its own process, started by a small launcher
  (`bench/_launch.py`: fork + exec, so a tool's peak RSS is not inflated by the bench
  process's own memory). The wall time runs from before the fork to the tool's exit
  (`waitid`); the peak RSS is `ru_maxrss` from `wait4` (it reads at least the
  launcher's {floor} MiB); the bytes read and written are `/proc/PID/io`, read after
  the exit and before the reap.
- **Warm page cache.** Each source is read once before the timed runs; sources stay in
  memory for the runs (the machine has enough RAM for every data set).
- **`sync` before each timed run,** so the writeback of one run's output does not land
  in the next. Writeback that starts during a run (the kernel's dirty thresholds) is
  part of that run's time, for ckpt and baseline alike.
- **No fsync on either side:** ckpt does not fsync a local remote, and no baseline
  fsyncs. Object stores hold the data in the server's memory (moto).
- **Minimum and median of several runs** (`--runs`), every run listed; the tools of a
  round run back to back and take turns going first, so a noisy neighbour hits both.
  Each target names the statistic it is judged on: the **ratio of minimums** (noise on
  a shared machine only adds time, so the fastest run of each tool is its least
  disturbed one, and one slow run cannot flip a verdict), or, for the long overhead
  runs where the difference is a few percent, the **median of the per-round paired
  ratios** (ckpt's run over the baseline run of the same round). Every ratio table
  shows both, and the ratio of medians. Every figure is a ratio to a baseline measured
  in the same bench run, on the same machine, except the targets the issue gives in
  absolute terms (in-process snapshot time, `ckpt --help` time, idle CPU, peak RSS).
- **Installed as users get it.** ckpt's packages are byte-compiled before the cases
  (`python -m compileall`, as pip does at install): an editable install under
  PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module in every process.
- **Isolation.** HOME, XDG dirs, rclone's config and the AWS CLI's config and
  credentials all point into the work dir; no tool reads the user's; nothing is sent
  to an address other than 127.0.0.1.
"""


#: A load average above this many times the cores marks a run as busy.
BUSY = 1.0


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else "not found"


def machine(b: Bench, started: datetime.datetime) -> list[tuple[str, str]]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    commit = output(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"])
    dirty = output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "cli", "shims"])
    if commit and dirty:
        commit += " (with uncommitted changes in cli/ or shims/)"
    py = output([b.python, "-c", "import sys; print(sys.version.split()[0])"])
    versions = output(
        [
            b.python,
            "-c",
            "import importlib.metadata as m\n"
            "for p in ('fsspec', 's3fs', 'moto', 'blake3'):\n"
            "    try: print(p, m.version(p))\n"
            "    except m.PackageNotFoundError: print(p, '-')",
        ]
    )
    rclone, aws = b.tools["rclone"], b.tools["aws"]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("CPU", f"{cpu}, {os.cpu_count()} cores"),
        ("RAM", f"{mem / 2**30:.1f} GiB"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("work dir filesystem", f"{fs_type(b.work)} ({b.work})"),
        ("load average at start", load),
        ("free page reporting", page_reporting()),
        ("Python", f"{py} ({b.python}); bench process {sys.version.split()[0]}"),
        ("ckpt", f"{_first_line(output([b.ckpt, '--version']))}, git {commit or 'unknown'}"),
        ("python packages", "; ".join(versions.splitlines())),
        ("cp", _first_line(output(["cp", "--version"]))),
        ("tar", _first_line(output(["tar", "--version"]))),
        ("gzip", _first_line(output(["gzip", "--version"]))),
        ("rsync", _first_line(output(["rsync", "--version"]))),
        ("rclone", _first_line(output([rclone, "version"])) if rclone else "not found"),
        ("aws", _first_line(output([aws, "--version"])) if aws else "not found"),
        ("date", started.strftime("%Y-%m-%d %H:%M:%S %Z")),
    ]


def page_reporting() -> str:
    """Whether the kernel hands free memory back to a hypervisor (virtio
    free page reporting): then memory freed more than about 2 s ago costs
    several times more to write into again (bench/tools/freed_idle.py)."""
    params = Path("/sys/module/page_reporting/parameters")
    try:
        order = (params / "page_reporting_order").read_text().strip()
    except OSError:
        return "not in this kernel (or not a module with parameters)"
    try:
        reported = int((params / "reported_kib").read_text()) >> 20
    except (OSError, ValueError):
        reported = -1
    if reported == 0:
        return f"present (order {order}), nothing reported since boot"
    since = f", {reported} GiB reported since boot" if reported > 0 else ""
    return (
        f"on (blocks of order {order} and up{since}): memory freed a few seconds before a "
        "run costs more to fill again (findings.md)"
    )


def fs_type(path: Path) -> str:
    """The filesystem type of the mount that holds path (/proc/mounts)."""
    best, kind = "", "unknown"
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mount = parts[1].replace("\\040", " ")
            inside = real == mount or real.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, parts[2]
    return kind


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _table(t: Table) -> list[str]:
    lines = [f"*{t.title}*", ""] if t.title else []
    lines.append(_row(t.headers))
    lines.append("|" + "---|" * len(t.headers))
    lines += [_row(row) for row in t.rows]
    return [*lines, ""]


def markdown(
    b: Bench,
    cases: list[Case],
    facts: list[tuple[str, str]],
    command: str,
    seconds: float,
) -> str:
    a = b.args
    targets = [t for c in cases for t in c.targets]
    passed = sum(t.passed for t in targets)
    lines = ["# ckpt benchmark", ""]
    if a.quick:
        lines += ["**Quick run (`--quick`): tiny sizes, the figures are not meaningful.**", ""]
    busy = [c.number for c in cases if max(c.load) > BUSY * (os.cpu_count() or 1)]
    if busy:
        lines += [
            f"**The machine was busy** (load average above {BUSY:g}x its "
            f"{os.cpu_count()} cores at the end of case(s) {', '.join(map(str, busy))}): "
            "other processes took CPU from both sides unevenly; a verdict wants a calm "
            "machine (compare the ratio of minimums with the median paired ratio).",
            "",
        ]
    lines += [
        f"`{command}`: {len(cases)} case(s) in {seconds / 60:.1f} min; "
        f"{passed} of {len(targets)} targets PASS (the summary is at the end). "
        "Chart: `chart.png`.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in facts],
        "",
        "## Method",
        "",
        METHOD.format(floor=f"{b.shared.get('rss_floor', 0) / 2**20:.1f}"),
        "Sizes of this run: "
        f"big set {a.size_mib} MiB in {a.files} files; {a.small_files} small files; "
        f"object store {a.s3_sets} (MiB x files; {a.stores}; {a.s3_runs} round(s)); "
        f"{a.runs} run(s) per figure, {a.slow_runs} for the slow baselines "
        f"(tar czf, tar xzf, aws s3 cp), {a.overhead_runs} round(s) of case 6, "
        f"{a.duty_runs} of case 12.",
        "",
    ]
    for c in cases:
        load = ", ".join(f"{x:.2f}" for x in c.load)
        lines += [
            f"## {c.number}. {c.title}",
            "",
            f"Took {c.seconds:.0f} s; load average at its end: {load}.",
            "",
        ]
        if c.conditions:
            lines += [f"**Durability and cache:** {c.conditions}", ""]
        if c.error:
            lines += ["The case failed:", "", "```", c.error.rstrip(), "```", ""]
        for para in c.method:
            lines += [para, ""]
        for t in c.tables:
            lines += _table(t)
        for note in c.notes:
            lines += [f"- {note}"]
        if c.notes:
            lines.append("")
        if c.targets:
            lines += ["| target | how | measured | wanted | result |", "|---|---|---|---|---|"]
            for t in c.targets:
                verdict = "PASS" if t.passed else "MISS"
                lines.append(_row([t.label, t.rule, t.fmt(t.value), t.wanted, f"**{verdict}**"]))
            lines.append("")
    lines += [
        "## Summary",
        "",
        "| case | target | measured | wanted | result |",
        "|---|---|---|---|---|",
    ]
    for t in targets:
        verdict = "**PASS**" if t.passed else "**MISS**"
        lines.append(_row([str(t.case), t.label, t.fmt(t.value), t.wanted, verdict]))
    for c in cases:
        if c.error:
            lines.append(f"| {c.number} | (the case failed: see its section) | | | **ERROR** |")
    lines.append("")
    return "\n".join(lines)


def chart(targets: list[Target], path: Path, title: str) -> None:
    """One small panel per target: its bar (green PASS, red MISS) against a
    dashed line at the target, each in its own unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = max(1, -(-len(targets) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.1 * rows), squeeze=False)
    for ax in axes.flat[len(targets) :]:
        ax.axis("off")
    for ax, t in zip(axes.flat, targets, strict=False):
        colour = "#2e9d46" if t.passed else "#d62f2f"
        ax.bar([0], [t.value], width=0.5, color=colour)
        ax.axhline(t.limit, color="black", linestyle="--", linewidth=1.2)
        top = max(t.value, t.limit, 1.0 if t.unit == "" else 1e-9) * 1.3
        ax.set_ylim(0, top)
        ax.set_xlim(-0.8, 0.8)
        ax.set_xticks([])
        ax.text(0, t.value + top * 0.02, t.fmt(t.value), ha="center", va="bottom", fontsize=9)
        ax.text(0.78, t.limit, f"target {t.wanted}", ha="right", va="bottom", fontsize=8)
        label = textwrap.fill(f"{t.case}: {t.label}", 48)
        ax.set_title(f"{label}\n{'PASS' if t.passed else 'MISS'}", fontsize=8.5)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
