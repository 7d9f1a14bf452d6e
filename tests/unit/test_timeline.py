"""`ckpt timeline` without the binary (cli/ckpt_cli/timeline.py and
timeline_file.py): which runs are drawn, the time axis (a long idle stretch
drawn short), and the files: they parse, name every attempt, fetch nothing,
and carry text from the repository escaped."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from typing import Any

import pytest

from ckpt_cli import timeline, timeline_file
from ckpt_cli.costs import Ledger
from ckpt_cli.errors import ConfigError

EVIL = "\x1b]0;pwned\x07<script>alert(1)</script>&\u202e"


def _rec(run: str, started: float, attempts: list[dict[str, Any]], **extra: Any) -> Any:
    return {
        "format": "ckpt-run",
        "version": 1,
        "run": run,
        "host": extra.pop("host", "vm"),
        "started": started,
        "ended": None,
        "attempts": attempts,
        "preemption": None,
        "snapshots": extra.pop("snapshots", []),
        **extra,
    }


def _att(n: int, start: float, end: float | None, outcome: str | None, **kw: Any) -> Any:
    out = {"number": n, "started": start, "resumed": kw.pop("resumed", ""), "exit": f"x{n}"}
    if end is not None:
        out.update(ended=end, outcome=outcome, status=75)
    return {**out, **kw}


#: A run preempted after two failures; its successor two hours later.
T = 1_800_000_000.0
RECORDS = [
    _rec("20270115T080000-aaaaaa", T - 50, [_att(1, T - 50, T - 40, "succeeded")]),
    _rec(
        "20270115T090000-bbbbbb",
        T,
        [
            _att(2, T, T + 100, "failed"),
            _att(3, T + 110, T + 200, "failed"),
            _att(4, T + 215, T + 320, "preempted", exit=EVIL),
        ],
        host=EVIL,
        snapshots=[
            {"id": "s1", "attempt": 2, "captured": T + 60},
            {"id": "s2", "attempt": 3, "captured": T + 170},
            {"id": "s3", "attempt": 4, "captured": T + 260},
        ],
        preemption={"cloud": "gcp", "received": T + 300},
        outcome="preempted",
    ),
    _rec("20270115T110000-cccccc", T + 7200, [_att(5, T + 7230, None, None, resumed="s3")]),
]


def test_by_default_the_newest_run_and_the_failed_runs_it_continued() -> None:
    _, runs = timeline.choose(RECORDS, None, None)
    assert [r.run for r in runs] == ["20270115T090000-bbbbbb", "20270115T110000-cccccc"]
    _, runs = timeline.choose(RECORDS, "20270115T08", None)
    assert [r.run for r in runs] == ["20270115T080000-aaaaaa"]
    _, runs = timeline.choose(RECORDS, "20270115T090000-bbbbbb", None)
    assert len(runs) == 1


@pytest.mark.parametrize("run", ["2027", "nope", "202"])
def test_a_run_that_is_not_one_is_one_line_naming_the_flag(run: str) -> None:
    with pytest.raises(ConfigError, match="--run"):
        timeline.choose(RECORDS, run, None)
    with pytest.raises(ConfigError, match="rank 3"):
        timeline.choose(RECORDS, None, 3)


def test_a_long_idle_stretch_is_drawn_short_and_the_axis_stays_in_order() -> None:
    _, runs = timeline.choose(RECORDS, None, None)
    lay = timeline.Layout(runs, T + 7300, 1000, 40)
    idle = [p for p in lay.pieces if p.idle]
    assert len(idle) == 1 and idle[0].x1 - idle[0].x0 == 40
    assert idle[0].t1 - idle[0].t0 == pytest.approx(7230 - 320)
    assert lay.x(T) == 0 and lay.x(T + 7300) == pytest.approx(1000)
    xs = [lay.x(T + s) for s in range(0, 7300, 50)]
    assert xs == sorted(xs)
    ticks = lay.ticks(80)
    assert all(b[0] - a[0] >= 79.9 for a, b in itertools.pairwise(ticks))
    assert not any(idle[0].x0 < x < idle[0].x1 for x, _ in ticks)
    assert ticks[0] == (0, 0)


def test_a_single_instant_does_not_divide_by_zero() -> None:
    rec = _rec("r", T, [_att(1, T, T, "failed")])
    _, runs = timeline.choose([rec], None, None)
    lay = timeline.Layout(runs, T, 100, 4)
    assert lay.x(T) == 0 and lay.ticks(10)


def _html_text(raw: str) -> str:
    class Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.words: list[str] = []

        def handle_data(self, data: str) -> None:
            self.words.append(data)

    parser = Text()
    parser.feed(raw)
    parser.close()
    return " ".join(parser.words)


@pytest.mark.parametrize("kind", ["svg", "html"])
def test_the_file_parses_names_every_attempt_and_escapes_the_repository(kind: str) -> None:
    _, runs = timeline.choose(RECORDS, None, None)
    raw = timeline_file.render(runs, T + 7300, kind)
    words = " ".join(ET.fromstring(raw).itertext()) if kind == "svg" else _html_text(raw)
    for n in (2, 3, 4, 5):
        assert f"attempt {n}:" in words, n
    assert "<script>" not in raw and "\x1b" not in raw and "\u202e" not in raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;" in raw
    assert "\\x1b]0;pwned\\x07" in words  # shown as ckpt shows it in a terminal
    assert "+1 h 55 min" in words  # the idle stretch's length
    for fetch in ("<script", "<link", "@import", "url(http", "src=", "href="):
        assert fetch not in raw, fetch


def test_the_terminal_chart_draws_every_mark_in_one_line_a_row() -> None:
    _, runs = timeline.choose(RECORDS, None, None)
    lines = [
        "".join(text for text, _ in line) for line in timeline.terminal_lines(runs, T + 7300, 100)
    ]
    assert lines[0].startswith("ckpt timeline: 2 runs, 4 attempts: 3 failures")
    widths = {len(line) for line in lines[4:-1]}
    assert widths == {99}, widths  # a column to spare: no terminal wraps it
    bar = lines[4]
    for glyph in ("█", "▒", "✗", "·"):
        assert glyph in bar, glyph
    assert "!" in lines[6] and "▴" in lines[6]
    assert "►" in lines[7]  # the running attempt
    assert "\\x1b]0;pwned\\x07" in lines[5]  # the host, escaped before it is cut
    assert "≈≈≈" in lines[3]


def test_kind_of_and_clock() -> None:
    assert [timeline_file.kind_of(n) for n in ("a.SVG", "b.html", "c.htm", "d.png")] == [
        "svg",
        "html",
        "html",
        None,
    ]
    assert [timeline.clock(s) for s in (0, 59.6, 600, 3725)] == ["0:00", "1:00", "10:00", "1:02:05"]


def test_the_chart_adds_up_the_runs_it_draws() -> None:
    _, runs = timeline.choose(RECORDS, None, None)
    totals = [Ledger(RECORDS).runs[r.run].totals() for r in runs]
    lost = sum(t["lost_seconds"] for t in totals)
    assert lost == pytest.approx(100 - 60 + 200 - 170 + 320 - 260)
    assert timeline.summary(runs) == (
        "2 runs, 4 attempts: 3 failures, 2 min 10 s of work lost, 1 h 55 min resuming"
    )
