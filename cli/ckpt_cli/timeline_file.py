"""`ckpt timeline --out FILE`: the timeline as one self-contained file to
attach to a bug report: SVG, or HTML holding that SVG and the attempts
table. Nothing in it is fetched: no script, no external font, style or
image; system fonts only.

Every string from the repository (run ids, host names, exit descriptions)
is cleaned like a terminal line (`console.clean`: control characters
escaped, secrets scrubbed) and then escaped for XML/HTML.
"""

from __future__ import annotations

import html

from ckpt_cli import console, costs
from ckpt_cli.timeline import (
    BLUE,
    COLUMNS,
    ENDS,
    GREEN,
    GREY,
    ORANGE,
    PURPLE,
    VERMILLION,
    Layout,
    before,
    clock,
    describe_attempt,
    end_of,
    local,
    rows,
    summary,
)

WIDTH = 1200
LEFT = 236  # the run labels
RIGHT = 36
TOP = 96  # title, subtitle, axis labels
LANE = 76
BAR = 26
FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif'


def esc(text: object) -> str:
    """Text from outside, as it may stand in XML or HTML."""
    return html.escape(console.clean(text), quote=True)


def svg(runs: list[costs.RunCosts], now: float, *, standalone: bool = True) -> str:
    """The chart as an SVG document (standalone: with its XML declaration)."""
    plot = WIDTH - LEFT - RIGHT
    lay = Layout(runs, now, plot, 44)
    height = TOP + LANE * len(runs) + 64
    out: list[str] = []
    if standalone:
        out.append('<?xml version="1.0" encoding="UTF-8"?>')
    out.append(
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" role="img" font-family=\'{FONT}\' font-size="13">'
    )
    out.append(f"<title>ckpt timeline: {esc(summary(runs))}</title>")
    out.append(
        "<defs>"
        '<pattern id="lost" patternUnits="userSpaceOnUse" width="7" height="7" '
        'patternTransform="rotate(45)">'
        f'<rect width="7" height="7" fill="{VERMILLION}"/>'
        '<rect width="3" height="7" fill="#ffffff" fill-opacity="0.35"/></pattern>'
        "</defs>"
    )
    out.append(f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>')
    out.append(
        '<text x="24" y="32"><tspan font-size="19" font-weight="600" fill="#1a1a1a">'
        'ckpt timeline</tspan><tspan dx="14" font-size="15" fill="#333333">'
        f"{esc(summary(runs))}</tspan></text>"
        f'<text x="24" y="54" fill="#555555">elapsed time since {esc(local(lay.start))} '
        "(this machine's local time); hover a mark for details</text>"
    )
    out += _axis(lay, height)
    for i, r in enumerate(runs):
        out += _lane(r, lay, TOP + LANE * i, now, runs)
    out += _legend(height - 30)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _x(lay: Layout, t: float) -> float:
    return round(LEFT + lay.x(t), 1)


def _axis(lay: Layout, height: int) -> list[str]:
    y = TOP - 12
    out = [f'<line x1="{LEFT}" y1="{y}" x2="{WIDTH - RIGHT}" y2="{y}" stroke="#999999"/>']
    bottom = height - 56
    for x, seconds in lay.ticks(80):
        px = round(LEFT + x, 1)
        out.append(
            f'<line x1="{px}" y1="{y}" x2="{px}" y2="{bottom}" stroke="#e6e6e6"/>'
            f'<line x1="{px}" y1="{y - 5}" x2="{px}" y2="{y}" stroke="#999999"/>'
            f'<text x="{px}" y="{y - 9}" text-anchor="middle" fill="#555555">'
            f"{clock(seconds)}</text>"
        )
    for p in lay.pieces:
        if not p.idle:
            continue
        x0, x1 = LEFT + p.x0, LEFT + p.x1
        mid = round((x0 + x1) / 2, 1)
        out.append(
            f'<rect x="{x0 + 6:.1f}" y="{y - 4}" width="{x1 - x0 - 12:.1f}" height="8" '
            'fill="#ffffff"/>'
            f'<path d="M{x0 + 8:.1f} {y + 5} l8 -10 M{x1 - 16:.1f} {y + 5} l8 -10" '
            'stroke="#999999" stroke-width="1.5"/>'
            f'<text x="{mid}" y="{y + 18}" text-anchor="middle" font-size="11" fill="#777777">'
            f"+{esc(costs.duration(p.t1 - p.t0))}</text>"
        )
    return out


def _lane(
    r: costs.RunCosts, lay: Layout, y: int, now: float, runs: list[costs.RunCosts]
) -> list[str]:
    mid = y + 20 + BAR / 2
    top = y + 20
    totals = r.totals()
    lost, resume = totals["lost_seconds"], totals["resume_seconds"]
    cost = console.plural(totals["failures"], "failure")
    if totals["failures"]:
        cost += ", " + ("lost unknown" if lost is None else f"{costs.duration(lost)} lost")
    back = "resuming unknown" if resume is None else f"{costs.duration(resume)} resuming"
    out = [
        f'<g class="run"><title>run {esc(r.run)} on {esc(r.host)}: '
        f"{esc(costs.describe(totals))}</title>"
        f'<text x="24" y="{top - 2}" font-weight="600" fill="#1a1a1a">{esc(r.run)}</text>'
        f'<text x="24" y="{top + 14}" font-size="12" fill="#555555">on {esc(r.host[:30])}</text>'
        f'<text x="24" y="{top + 29}" font-size="12" fill="#555555">{esc(cost)}</text>'
        f'<text x="24" y="{top + 44}" font-size="12" fill="#555555">{esc(back)}</text></g>'
    ]
    for a in r.attempts:  # resuming: a dashed line from the failure it follows
        k = before(a, runs)
        if k is None or k.end is None or a.start is None:
            continue
        ky = TOP + LANE * runs.index(next(rc for rc in runs if k in rc.attempts)) + 20 + BAR / 2
        x0, x1 = _x(lay, k.end), _x(lay, a.start)
        bend = round((x0 + x1) / 2, 1)
        label = "" if a.resume is None else costs.duration(a.resume)
        out.append(
            f"<g><title>resumed {esc(label)} after attempt {k.number} ended</title>"
            f'<path d="M{x0} {ky} C{bend} {ky} {bend} {mid} {x1} {mid}" fill="none" '
            f'stroke="{GREY}" stroke-width="1.6" stroke-dasharray="3 3"/>'
        )
        if x1 - x0 > 8 * len(label) + 16:
            out.append(
                f'<text x="{bend}" y="{mid - 6}" text-anchor="middle" font-size="11" '
                f'fill="{GREY}">{esc(label)}</text>'
            )
        out.append("</g>")
    for a in r.attempts:
        if a.start is None:
            continue
        x0, x1 = _x(lay, a.start), _x(lay, end_of(a, now))
        w = max(2.0, round(x1 - x0, 1))
        out.append(
            f'<g class="attempt"><title>{esc(describe_attempt(a, now))}</title>'
            f'<rect x="{x0}" y="{top}" width="{w}" height="{BAR}" rx="3" fill="{BLUE}"/>'
        )
        for run, _n, t0, t1 in a.spans:
            if run != r.run:
                continue
            s0, s1 = _x(lay, t0), _x(lay, t1)
            out.append(
                f'<rect x="{s0}" y="{top}" width="{max(1.5, round(s1 - s0, 1))}" '
                f'height="{BAR}" fill="url(#lost)"/>'
            )
        label = f"attempt {a.number}" if w > 80 else str(a.number or "?")
        if w > 8 * len(label) + 8:
            out.append(
                f'<text x="{x0 + 6}" y="{mid + 4.5}" fill="#ffffff" font-weight="600" '
                f'stroke="#08456b" stroke-width="3" paint-order="stroke">{esc(label)}</text>'
            )
        else:
            out.append(
                f'<text x="{x0}" y="{top - 5}" font-size="11" fill="#333333">{esc(label)}</text>'
            )
        out.append(_end_mark(a, x1, mid) + "</g>")
    for s in r.snapshots:  # ticks below the bar, at the moment each state is from
        sx = _x(lay, s.moment)
        out.append(
            f"<g><title>snapshot {esc(s.id)}: the state at {esc(local(s.moment, '%H:%M:%S'))}"
            f"</title>"
            f'<path d="M{sx} {top + BAR + 3} l-5 9 h10 z" fill="{GREEN}"/></g>'
        )
    if r.preemption is not None:
        px = _x(lay, r.preemption)
        out.append(
            f"<g><title>preemption notice received at "
            f"{esc(local(r.preemption, '%H:%M:%S'))}</title>"
            f'<path d="M{px} {top - 14} l7 7 l-7 7 l-7 -7 z" fill="{ORANGE}" stroke="#ffffff"/>'
            f'<text x="{px}" y="{top - 3}" text-anchor="middle" font-size="10" '
            'font-weight="700" fill="#1a1a1a">!</text></g>'
        )
    return out


def _end_mark(a: costs.AttemptCost, x: float, y: float) -> str:
    """A failure: a cross; a success: a tick; stopped: a square; running: an arrow."""
    colour = ENDS[a.outcome][1]
    if a.outcome in ("failed", "preempted", "killed"):
        return (
            f'<circle cx="{x}" cy="{y}" r="9" fill="{colour}" stroke="#ffffff" stroke-width="2"/>'
            f'<path d="M{x - 4} {y - 4} l8 8 M{x + 4} {y - 4} l-8 8" stroke="#ffffff" '
            'stroke-width="2.2" stroke-linecap="round"/>'
        )
    if a.outcome == "succeeded":
        return (
            f'<circle cx="{x}" cy="{y}" r="9" fill="{colour}" stroke="#ffffff" stroke-width="2"/>'
            f'<path d="M{x - 4.5} {y} l3 3.5 l6 -7" fill="none" stroke="#ffffff" '
            'stroke-width="2.2" stroke-linecap="round" stroke-linejoin="round"/>'
        )
    if a.outcome == "stopped":
        return f'<rect x="{x - 7}" y="{y - 7}" width="14" height="14" fill="{PURPLE}"/>'
    return f'<path d="M{x} {y - 8} l9 8 l-9 8 z" fill="{colour}"/>'


def _legend(y: int) -> list[str]:
    items = [
        (f'<rect x="0" y="-11" width="22" height="14" rx="2" fill="{BLUE}"/>', "attempt running"),
        ('<rect x="0" y="-11" width="22" height="14" fill="url(#lost)"/>', "work lost"),
        (
            f'<path d="M0 -4 h22" stroke="{GREY}" stroke-width="1.6" stroke-dasharray="3 3"/>',
            "resuming",
        ),
        (f'<path d="M11 -9 l-5 9 h10 z" fill="{GREEN}"/>', "snapshot"),
        (f'<path d="M11 -12 l7 7 l-7 7 l-7 -7 z" fill="{ORANGE}"/>', "preemption notice"),
        (
            f'<circle cx="11" cy="-4" r="8" fill="{VERMILLION}"/>'
            '<path d="M7 -8 l8 8 M15 -8 l-8 8" stroke="#ffffff" stroke-width="2"/>',
            "failure",
        ),
        (
            f'<circle cx="11" cy="-4" r="8" fill="{ORANGE}"/>'
            '<path d="M7 -8 l8 8 M15 -8 l-8 8" stroke="#ffffff" stroke-width="2"/>',
            "preempted",
        ),
        (f'<circle cx="11" cy="-4" r="8" fill="{GREEN}"/>', "success"),
        (f'<rect x="4" y="-11" width="14" height="14" fill="{PURPLE}"/>', "stopped"),
    ]
    out = [f'<g transform="translate(24 {y})" fill="#333333">']
    x = 0
    for shape, text in items:
        out.append(f'<g transform="translate({x} 0)">{shape}<text x="30" y="0">{text}</text></g>')
        x += 44 + int(7.4 * len(text))
    out.append("</g>")
    return out


STYLE = f"""
body {{ margin: 0; background: #f6f7f9; color: #1a1a1a; font-family: {FONT}; }}
main {{ max-width: 1240px; margin: 0 auto; padding: 20px; }}
.chart {{ background: #fff; border: 1px solid #dde1e6; border-radius: 6px; overflow-x: auto; }}
.chart svg {{ display: block; max-width: 100%; height: auto; }}
table {{ border-collapse: collapse; margin-top: 18px; background: #fff; font-size: 14px; }}
th, td {{ padding: 5px 12px; border-bottom: 1px solid #e3e6ea; text-align: left;
  white-space: nowrap; }}
th {{ background: #eef1f4; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
dl {{ font-size: 14px; color: #444; }} dt {{ font-weight: 600; margin-top: 8px; }}
"""


def page(runs: list[costs.RunCosts], now: float) -> str:
    """An HTML page: the chart, the attempts table, what the numbers mean."""
    numeric = {"attempt", "ran", "work lost", "resumed after"}
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{esc(v)}</td>' if c in numeric else f"<td>{esc(v)}</td>"
            for c, v in zip(COLUMNS, row, strict=True)
        )
        + "</tr>"
        for row in rows(runs, now)
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>ckpt timeline: {esc(summary(runs))}</title><style>{STYLE}</style></head>"
        f'<body><main><div class="chart">{svg(runs, now, standalone=False)}</div>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        "<dl><dt>work lost</dt><dd>training time between the state the next attempt "
        "started from and the failure: it has to be done again</dd>"
        "<dt>resumed after</dt><dd>from the failure to the next attempt's start: backoff, "
        "restore and a replacement machine included</dd></dl>"
        "</main></body></html>\n"
    )


def render(runs: list[costs.RunCosts], now: float, kind: str) -> str:
    """The file's text: kind "svg" or "html"."""
    return svg(runs, now) if kind == "svg" else page(runs, now)


def kind_of(name: str) -> str | None:
    """ "svg" or "html" by the file name's extension, else None."""
    lower = name.lower()
    if lower.endswith(".svg"):
        return "svg"
    return "html" if lower.endswith((".html", ".htm")) else None
