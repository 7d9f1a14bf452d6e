"""The only module that prints: ckpt's own lines go to stderr, prefixed `ckpt:`.

The child's stdout and stderr are inherited file descriptors and never pass
through here. Off a terminal the output is plain text with no control
characters; `--quiet` leaves errors only, `--verbose` adds debug lines.

On a terminal, `ckpt run` shows its live status in the terminal's title
(`title()`), not in the text: the child's output passes straight to the same
terminal, and a status line of ckpt's own would be torn by it (or tear it).
The title is saved when it is first set and restored at the end (xterm's
title stack, which tmux, VTE and iTerm2 keep too).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from rich.console import Console
from rich.text import Text

from ckpt_cli.redact import scrub

_lock = threading.Lock()
_quiet = False
_verbose = False
_console: Console | None = None
_title_pushed = False


def _get() -> Console:
    global _console
    if _console is None:
        _console = Console(
            file=sys.stderr,
            soft_wrap=True,
            highlight=False,
            no_color="NO_COLOR" in os.environ,
        )
    return _console


def configure(*, quiet: bool = False, verbose: bool = False) -> None:
    """Set verbosity for the rest of the process."""
    global _quiet, _verbose, _console
    _quiet, _verbose = quiet, verbose and not quiet
    _console = None  # re-detect the terminal (tests swap sys.stderr)


def is_terminal() -> bool:
    """ckpt's own output (stderr) goes to a terminal that understands control
    sequences."""
    return sys.stderr.isatty() and os.environ.get("TERM", "") not in ("", "dumb")


def _emit(message: str, style: str | None) -> None:
    line = Text("ckpt: ", style="bold" if style else "")
    line.append(scrub(message), style=style or "")
    with _lock:
        _get().print(line)


def info(message: str) -> None:
    """A normal progress line; hidden by --quiet."""
    if not _quiet:
        _emit(message, None)


def debug(message: str) -> None:
    """Detail for --verbose only."""
    if _verbose:
        _emit(f"debug: {message}", "dim")


def warn(message: str) -> None:
    """Something went wrong but ckpt carries on; hidden by --quiet."""
    if not _quiet:
        _emit(f"warning: {message}", "yellow")


def error(message: str) -> None:
    """ckpt cannot do what was asked."""
    _emit(f"error: {message}", "bold red")


def title(text: str | None) -> None:
    """Show text in the terminal's title (None: put the old title back). Only
    on a terminal; nothing off one (CI logs get no control characters)."""
    global _title_pushed
    if not is_terminal():
        return
    clean = "".join(ch for ch in scrub(text or "") if ch.isprintable())
    with _lock:
        if text is None:
            if _title_pushed:
                sys.stderr.write("\x1b[23;0t")  # pop the saved title
                _title_pushed = False
        else:
            if not _title_pushed:
                sys.stderr.write("\x1b[22;0t")  # push the current title
                _title_pushed = True
            sys.stderr.write(f"\x1b]0;{clean}\x07")
        sys.stderr.flush()


class Progress:
    """A progress bar on stderr (bytes, rate, ETA) for restore and push, on a
    terminal only; off one, and under --quiet, it does nothing. `update(done,
    total)` may be called from any thread, as often as it likes."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if is_terminal() and not _quiet:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("ckpt: {task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=_get(),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=None)
        return self

    def update(self, done: int, total: int | None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total or None)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def summary(title_text: str, columns: list[str], rows: list[list[str]]) -> None:
    """A short table on stderr (the end of `ckpt run`): a rich table on a
    terminal, one plain `ckpt:` line per row off one."""
    if _quiet:
        return
    if not is_terminal():
        info(title_text)
        for row in rows:
            info("  " + ", ".join(f"{c} {v}" for c, v in zip(columns, row, strict=True) if v))
        return
    from rich.table import Table

    t = Table(title=title_text, title_justify="left", box=None, pad_edge=False)
    for c in columns:
        t.add_column(c)
    for row in rows:
        t.add_row(*(scrub(v) for v in row))
    with _lock:
        _get().print(t)


def table(renderable: Any) -> None:
    """Print a rich renderable (tables of `ckpt ls`) to stdout: it is the command's
    output. Off a terminal nothing limits the width (rich would squeeze a table
    into $COLUMNS or 80 and cut snapshot ids short), so one row is one line."""
    width = None if sys.stdout.isatty() else 100_000
    with _lock:
        Console(
            soft_wrap=True, highlight=False, no_color="NO_COLOR" in os.environ, width=width
        ).print(renderable)


def fmt_age(seconds: float) -> str:
    """12s, 4m05s, 3h02m, 2d04h."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    m, sec = divmod(int(seconds), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
