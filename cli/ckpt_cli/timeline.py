"""`ckpt timeline`: a run drawn on a time axis: attempts as bars, snapshots as
ticks, preemption notices and failures as markers, lost work shaded, the time
to resume as a dotted stretch. This module chooses the runs, lays them out
(`Layout`: time -> position, a long idle stretch between runs drawn short and
labelled) and draws them in the terminal; `timeline_file` writes the same
layout as one self-contained SVG or HTML file.

Pure but for `show`, which prints through `console`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from ckpt_cli import console, costs
from ckpt_cli.errors import ConfigError

#: Runs drawn at most: the chosen one and the failed runs it continued.
MAX_RUNS = 10
#: An idle stretch (no run going on) longer than this share of the active
#: time, and than MIN_BREAK seconds, is drawn short, with its length written.
BREAK_SHARE = 0.2
MIN_BREAK = 30.0
#: Colour-blind-safe colours (Okabe and Ito), used by the terminal and the file.
BLUE, VERMILLION, GREEN, ORANGE, PURPLE, GREY = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#E69F00",
    "#CC79A7",
    "#777777",
)
#: How an attempt's end is marked: glyph, colour, word.
ENDS = {
    "succeeded": ("✓", GREEN, "succeeded"),
    "failed": ("✗", VERMILLION, "failed"),
    "preempted": ("✗", ORANGE, "preempted"),
    "killed": ("✗", VERMILLION, "killed (no end recorded)"),
    "stopped": ("■", PURPLE, "stopped"),
    None: ("►", BLUE, "running"),
}


def choose(
    records: list[dict[str, Any]], run: str | None, rank: int | None
) -> tuple[costs.Ledger, list[costs.RunCosts]]:
    """The runs to draw: `run` (an id or a unique prefix of 4+ characters;
    default the newest run, of `rank` if given) and the failed runs it
    continued, oldest first. ConfigError naming --run / --rank if none."""
    ledger = costs.Ledger(records)
    pool = [r for r in ledger.runs.values() if rank is None or r.rank == rank]
    if run is None:
        if not pool:
            raise ConfigError(f"no run of rank {rank} is recorded (ckpt ls --runs lists them)")
        return ledger, costs.chain(ledger, pool[-1].run, MAX_RUNS)
    found = [r for r in pool if r.run == run] or (
        [r for r in pool if r.run.startswith(run)] if len(run) >= 4 else []
    )
    if len(found) != 1:
        what = "no recorded run matches" if not found else f"{len(found)} runs match"
        raise ConfigError(
            f"--run {console.clean(run)}: {what} (give an id from `ckpt ls --runs`, "
            "or 4+ of its first characters)"
        )
    return ledger, costs.chain(ledger, found[0].run, MAX_RUNS)


@dataclasses.dataclass(frozen=True)
class Piece:
    """A stretch of the axis: seconds t0..t1 drawn from x0 to x1; `idle`: a
    long stretch with no run, drawn short."""

    t0: float
    t1: float
    x0: float
    x1: float
    idle: bool = False


class Layout:
    """Where each moment goes on an axis `width` units wide (characters or
    pixels): linear over the runs, a long idle stretch between them drawn
    `break_width` wide."""

    def __init__(self, runs: list[costs.RunCosts], now: float, width: float, break_width: float):
        self.runs, self.now = runs, now
        spans = sorted(_span(r, now) for r in runs)
        merged: list[list[float]] = []
        for t0, t1 in spans:
            if merged and t0 <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], t1)
            else:
                merged.append([t0, t1])
        active = sum(t1 - t0 for t0, t1 in merged)
        pieces: list[tuple[float, float, bool]] = []
        for (a0, a1), nxt in zip(merged, [*merged[1:], None], strict=True):
            pieces.append((a0, a1, False))
            if nxt is not None:
                gap = nxt[0] - a1
                pieces.append((a1, nxt[0], gap > max(MIN_BREAK, BREAK_SHARE * active)))
        linear = max(1e-3, sum(t1 - t0 for t0, t1, idle in pieces if not idle))
        breaks = sum(idle for _, _, idle in pieces)
        per_second = max(1e-9, (width - breaks * break_width) / linear)
        self.pieces: list[Piece] = []
        x = 0.0
        for t0, t1, idle in pieces:
            w = break_width if idle else (t1 - t0) * per_second
            self.pieces.append(Piece(t0, t1, x, x + w, idle))
            x += w
        self.start = merged[0][0]
        self.per_second = per_second

    def x(self, t: float) -> float:
        for p in self.pieces:
            if t <= p.t1:
                if t <= p.t0 or p.t1 == p.t0:
                    return p.x0
                return p.x0 + (p.x1 - p.x0) * (t - p.t0) / (p.t1 - p.t0)
        return self.pieces[-1].x1

    def ticks(self, spacing: float) -> list[tuple[float, float]]:
        """(x, seconds since the start) of axis ticks at least `spacing`
        apart, at round steps, none inside a drawn-short stretch."""
        step = next((s for s in _STEPS if s * self.per_second >= spacing), _STEPS[-1])
        out: list[tuple[float, float]] = []
        for p in self.pieces:
            if p.idle:
                continue
            k = math.ceil((p.t0 - self.start) / step - 1e-9)
            while self.start + k * step <= p.t1 + 1e-9:
                x = self.x(self.start + k * step)
                if not out or x - out[-1][0] >= spacing * 0.999:
                    out.append((x, k * step))
                k += 1
        return out


_STEPS = [
    s * unit
    for unit in (1, 60, 3600)
    for s in ((1, 2, 5, 10, 15, 30) if unit < 3600 else (1, 2, 3, 6, 12, 24, 48))
]


def _span(r: costs.RunCosts, now: float) -> tuple[float, float]:
    starts = [a.start for a in r.attempts if a.start is not None]
    ends = [end_of(a, now) for a in r.attempts]
    t0 = min(starts, default=r.started)
    return t0, max([t0, *ends, *(s.moment for s in r.snapshots if s.moment >= t0)])


def end_of(a: costs.AttemptCost, now: float) -> float:
    """Where an attempt's bar ends: its end, else (running) now."""
    if a.end is not None:
        return a.end
    return max(now, a.start or now) if a.outcome is None else (a.start or now)


def clock(seconds: float) -> str:
    """An axis label: 0:30, 12:00, 1:02:00."""
    s = round(seconds)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def local(t: float | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return "?" if t is None else time.strftime(fmt, time.localtime(t))


def summary(runs: list[costs.RunCosts]) -> str:
    """ "2 runs, 5 attempts: 3 failures, 36 s of work lost, 2 min 43 s resuming"."""
    n = sum(len(r.attempts) for r in runs)
    totals = [r.totals() for r in runs]
    lost = [t["lost_seconds"] for t in totals]
    resume = [t["resume_seconds"] for t in totals]
    merged = {
        "failures": sum(t["failures"] for t in totals),
        "lost_seconds": None if None in lost else math.fsum(lost),
        "resume_seconds": None if None in resume else math.fsum(resume),
    }
    head = f"{console.plural(len(runs), 'run')}, {console.plural(n, 'attempt')}"
    return f"{head}: {costs.describe(merged)}"


def describe_attempt(a: costs.AttemptCost, now: float) -> str:
    """One attempt in words (a tooltip, a table row)."""
    words = ENDS[a.outcome][2]
    ran = "?" if a.start is None else costs.duration(end_of(a, now) - a.start)
    out = f"attempt {a.number or '?'}: {local(a.start, '%H:%M:%S')}, ran {ran}"
    out += f", {a.exit}, {words}" if a.exit else f", {words}"
    if a.failure:
        lost = "unknown" if a.lost is None else costs.duration(a.lost)
        out += f"; work lost: {lost}"
    if a.followed_by is not None and a.followed_by.resume is not None:
        out += f"; resumed {costs.duration(a.followed_by.resume)} later"
    return out


def rows(runs: list[costs.RunCosts], now: float) -> list[list[str]]:
    """The attempts table under the chart (and in the HTML file)."""
    out = []
    for r in runs:
        for a in r.attempts:
            ran = "?" if a.start is None else costs.duration(end_of(a, now) - a.start)
            lost = "" if not a.failure else "unknown" if a.lost is None else costs.duration(a.lost)
            nxt = a.followed_by
            back = (
                ""
                if nxt is None
                else "unknown"
                if nxt.resume is None
                else costs.duration(nxt.resume)
            )
            out.append(
                [
                    str(a.number or "?"),
                    r.run,
                    r.host,
                    local(a.start),
                    ran,
                    a.exit or "-",
                    ENDS[a.outcome][2],
                    lost,
                    back,
                ]
            )
    return out


def _maybe(seconds: float | None) -> str:
    return "unknown" if seconds is None else costs.duration(seconds)


COLUMNS = (
    "attempt",
    "run",
    "host",
    "started",
    "ran",
    "exit",
    "outcome",
    "work lost",
    "resumed after",
)

# ---------------------------------------------------------------- the terminal

LABEL = 24  # columns of the label beside each run
#: The terminal chart's marks: glyph, colour, words, and the outcome an
#: attempt must have had for it to be shown ("": always).
LEGEND = (
    ("█", BLUE, "attempt", ""),
    ("▒", VERMILLION, "work lost", ""),
    ("·", GREY, "resuming", ""),
    ("▴", GREEN, "snapshot", ""),
    ("!", ORANGE, "preemption notice", ""),
    ("✗", VERMILLION, "failure", ""),
    ("✗", ORANGE, "preempted", "preempted"),
    ("✓", GREEN, "success", ""),
    ("■", PURPLE, "stopped", "stopped"),
    ("►", BLUE, "running", "running"),
)


def show(runs: list[costs.RunCosts], now: float, width: int) -> None:
    """The chart and the attempts table on stdout."""
    console.chart(terminal_lines(runs, now, width), width=max(width, 60))
    console.out([""])
    console.table(COLUMNS, rows(runs, now), right=("attempt", "ran", "work lost", "resumed after"))


Segments = list[tuple[str, str]]


def terminal_lines(runs: list[costs.RunCosts], now: float, width: int) -> list[Segments]:
    """The chart as lines of (text, style) segments."""
    cols = max(30, min(width, 200) - LABEL - 1)
    lay = Layout(runs, now, cols - 1, 3)
    lines: list[Segments] = [[(f"ckpt timeline: {summary(runs)}", "bold")]]
    lines.append([(f"elapsed time since {local(lay.start)} (this machine's local time)", "dim")])
    labels, axis = [" "] * cols, ["─"] * cols
    for x, seconds in lay.ticks(10):
        c = min(cols - 1, round(x))
        axis[c] = "┼" if c else "├"
        _put(labels, c, clock(seconds))
    for p in lay.pieces:
        if p.idle:
            c = min(cols - 1, round(p.x0))
            axis[c : c + 3] = list("≈≈≈")[: max(0, cols - c)]
            _put(labels, c, "+" + costs.duration(p.t1 - p.t0).replace(" ", ""))
    lines.append([(" " * LABEL, ""), ("".join(labels), "dim")])
    lines.append([(" " * LABEL, ""), ("".join(axis), "dim")])
    for r in runs:
        bar, marks, numbers = _lane(r, lay, cols, now)
        lines.append([(_label(r.run), "bold"), *bar])
        lines.append([(_label(f"on {r.host}"), "dim"), ("".join(numbers), "")])
        lines.append([(" " * LABEL, ""), *marks])
    ended = {a.outcome or "running" for r in runs for a in r.attempts}
    legend: Segments = [("legend: ", "dim")]
    for glyph, style, words, only in LEGEND:
        if not only or only in ended:
            legend += [(glyph, style), (f" {words}  ", "")]
    lines.append(legend)
    return lines


def _lane(
    r: costs.RunCosts, lay: Layout, cols: int, now: float
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    cells: list[tuple[str, str]] = [(" ", "")] * cols
    numbers = [" "] * cols
    marks: list[tuple[str, str]] = [(" ", "")] * cols

    def cell(t: float) -> int:
        return max(0, min(cols - 1, math.floor(lay.x(t))))

    def fill(t0: float, t1: float, glyph: str, style: str) -> None:
        c0, c1 = cell(t0), cell(t1)
        for c in range(c0, max(c0, c1) + 1):
            cells[c] = (glyph, style)

    for a in r.attempts:
        k = before(a, lay.runs)
        if k is not None and k.end is not None and a.start is not None:
            fill(k.end, a.start, "·", GREY)  # resuming: the bars and markers go over it
    for a in r.attempts:
        if a.start is None:
            continue
        fill(a.start, end_of(a, now), "█", BLUE)
    for a in r.attempts:
        for run, _number, t0, t1 in a.spans:
            if run == r.run:
                fill(t0, t1, "▒", VERMILLION)
    for a in r.attempts:
        if a.start is None:
            continue
        glyph, colour, _ = ENDS[a.outcome]
        cells[cell(end_of(a, now))] = (glyph, f"bold {colour}")
        _put(numbers, cell(a.start), str(a.number or "?"))
    for s in r.snapshots:
        marks[cell(s.moment)] = ("▴", GREEN)
    if r.preemption is not None:
        marks[cell(r.preemption)] = ("!", f"bold {ORANGE}")
    return _runs_of(cells), _runs_of(marks), numbers


def before(a: costs.AttemptCost, runs: list[costs.RunCosts]) -> costs.AttemptCost | None:
    """The failure the relaunch a follows, if it is drawn."""
    for rc in runs:
        for k in rc.attempts:
            if k.followed_by is a:
                return k
    return None


def _runs_of(cells: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Adjacent cells of one style joined into one segment."""
    out: list[tuple[str, str]] = []
    for glyph, style in cells:
        if out and out[-1][1] == style:
            out[-1] = (out[-1][0] + glyph, style)
        else:
            out.append((glyph, style))
    return out


def _label(text: str) -> str:
    """text from a record as one LABEL-wide cell: escaped first, then cut."""
    return console.clean(text)[: LABEL - 1].ljust(LABEL)


def _put(line: list[str], at: int, text: str) -> None:
    """Write text into line from column at, if it fits over blanks only,
    a blank on either side."""
    end = at + len(text)
    if end <= len(line) and all(c == " " for c in line[max(0, at - 1) : end + 1]):
        line[at:end] = list(text)
