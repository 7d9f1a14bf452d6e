"""The only module that prints: ckpt's own lines go to stderr, prefixed `ckpt:`.

The child's stdout and stderr are inherited file descriptors and never pass
through here. Off a terminal the output is plain text with no control
characters; `--quiet` leaves warnings and errors only.
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
_console: Console | None = None


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


def configure(*, quiet: bool = False) -> None:
    """Set verbosity for the rest of the process."""
    global _quiet, _console
    _quiet = quiet
    _console = None  # re-detect the terminal (tests swap sys.stderr)


def _emit(message: str, style: str | None) -> None:
    line = Text("ckpt: ", style="bold" if style else "")
    line.append(scrub(message), style=style or "")
    with _lock:
        _get().print(line)


def info(message: str) -> None:
    """A normal progress line; hidden by --quiet."""
    if not _quiet:
        _emit(message, None)


def warn(message: str) -> None:
    """Something went wrong but ckpt carries on."""
    _emit(f"warning: {message}", "yellow")


def error(message: str) -> None:
    """ckpt cannot do what was asked."""
    _emit(f"error: {message}", "bold red")


def table(renderable: Any) -> None:
    """Print a rich renderable (tables of `ckpt ls`) to stdout: it is the command's
    output. Off a terminal nothing limits the width (rich would squeeze a table
    into $COLUMNS or 80 and cut snapshot ids short), so one row is one line."""
    width = None if sys.stdout.isatty() else 100_000
    with _lock:
        Console(
            soft_wrap=True, highlight=False, no_color="NO_COLOR" in os.environ, width=width
        ).print(renderable)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
