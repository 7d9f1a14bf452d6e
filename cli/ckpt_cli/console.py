"""The only module that prints: ckpt's own lines go to stderr, prefixed `ckpt:`.

The child's stdout and stderr are inherited file descriptors and never pass
through here. Off a terminal the output is plain text with no control
characters; `--quiet` leaves errors only, `--verbose` adds debug lines.

On a terminal, `ckpt run` shows its live status in the terminal's title
(`title()`), not in the text: the child's output passes straight to the same
terminal, and a status line of ckpt's own would be torn by it (or tear it).
The title is saved when it is first set and restored at the end (xterm's
title stack, which tmux, VTE and iTerm2 keep too).

Everything printed here passes through `clean` (`redact.printable`): secrets
scrubbed, control characters escaped, so text from outside (file names,
manifests, run records, socket replies, library errors) can neither move the
cursor nor recolour or retitle the terminal; rich markup is never parsed in
it (every cell and line is a `Text`). A command's output goes to stdout
(`table`, `out`, `document`); a closed stdout raises BrokenPipeError for the
error funnel, while a closed stderr only silences ckpt's own lines (a
supervisor keeps its job running whoever stopped reading).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
from collections.abc import Collection, Iterable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

from ckpt_cli.redact import printable, scrub, scrub_doc

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

# rich is imported when something is first printed, not with this module: a
# command that prints nothing (`ckpt push -q`) never pays its 25-30 ms.

_lock = threading.Lock()
_quiet = False
_verbose = False
_console: Console | None = None
_title_pushed = False
_stderr_gone = False  # a write to stderr failed (closed pipe): ckpt's lines are dropped


@cache
def _console_class() -> type[Console]:
    from rich.console import Console

    class _Console(Console):
        """rich's Console, but a closed stream raises BrokenPipeError (rich's
        own answer is SystemExit(1), which ends whatever thread printed: a
        snapshot worker, or the supervisor itself, because someone stopped
        reading)."""

        def on_broken_pipe(self) -> None:
            raise BrokenPipeError(errno.EPIPE, "the reader of ckpt's output went away")

    return _Console


def _text(text: str = "", **kwargs: Any) -> Text:
    from rich.text import Text

    return Text(text, **kwargs)


def _get() -> Console:
    global _console
    if _console is None:
        _console = _console_class()(
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


def clean(text: object) -> str:
    """text as ckpt may print it: secrets scrubbed, control characters escaped."""
    return printable(str(text))


def _emit(message: str, style: str | None) -> None:
    global _stderr_gone
    line = _text("ckpt: ", style="bold" if style else "")
    line.append(clean(message), style=style or "")
    with _lock:
        if _stderr_gone:
            return
        try:
            _get().print(line)
        except OSError:  # stderr closed (`2>&1 | head`): nothing else to tell anyone
            _stderr_gone = True


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
    global _title_pushed, _stderr_gone
    if not is_terminal():
        return
    shown = "".join(ch for ch in scrub(text or "") if ch.isprintable())
    with _lock:
        if _stderr_gone:
            return
        try:
            if text is None:
                if _title_pushed:
                    sys.stderr.write("\x1b[23;0t")  # pop the saved title
                    _title_pushed = False
            else:
                if not _title_pushed:
                    sys.stderr.write("\x1b[22;0t")  # push the current title
                    _title_pushed = True
                sys.stderr.write(f"\x1b]0;{shown}\x07")
            sys.stderr.flush()
        except OSError:
            _stderr_gone = True


class Progress:
    """A long wait (a restore, a push, the final flush): on a terminal a
    progress bar on stderr (bytes, rate, ETA); off one, the one line `what`
    when it starts (the line that ends it is the caller's); nothing under
    --quiet. `update(done, total)` may be called from any thread, as often
    as it likes."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if not is_terminal():
            info(self.what)
        elif not _quiet:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("ckpt: {task.description}", markup=False),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=_get(),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(clean(self.what), total=None)
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
    global _stderr_gone
    if _quiet:
        return
    if not is_terminal():
        info(title_text)
        for row in rows:
            info("  " + ", ".join(f"{c} {v}" for c, v in zip(columns, row, strict=True) if v))
        return
    t = _table(columns, rows, title=_text(clean(title_text)))
    with _lock:
        if _stderr_gone:
            return
        try:
            _get().print(t)
        except OSError:
            _stderr_gone = True


def _table(
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    right: Collection[str] = (),
    header: bool = True,
    title: Text | None = None,
) -> Any:
    """A rich table whose every cell is plain text (no markup), cleaned."""
    from rich.table import Table

    t = Table(
        title=title,
        title_justify="left",
        box=None,
        pad_edge=False,
        show_header=header,
    )
    for c in columns:
        t.add_column(_text(c), justify="right" if c in right else "left")
    for row in rows:
        t.add_row(*(_text(clean(v)) for v in row))
    return t


def table(
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    right: Collection[str] = (),
    header: bool = True,
) -> None:
    """Print a table (`ckpt ls`, `show`, `diff`, `verify`) to stdout: it is the
    command's output. Every cell is cleaned and taken as plain text. Off a
    terminal nothing limits the width (rich would squeeze a table into
    $COLUMNS or 80 and cut snapshot ids short), so one row is one line."""
    width = None if sys.stdout.isatty() else 100_000
    rendered = _table(columns, rows, right=right, header=header)
    with _lock:
        _console_class()(
            soft_wrap=True, highlight=False, no_color="NO_COLOR" in os.environ, width=width
        ).print(rendered)


def out(lines: Iterable[str]) -> None:
    """Plain lines of a command's output on stdout (`ckpt status`), each
    cleaned (a line break inside one is escaped: one line stays one line)."""
    text = "".join(clean(line) + "\n" for line in lines)
    with _lock:
        sys.stdout.write(text)
        sys.stdout.flush()


def document(doc: Any) -> None:
    """One JSON document on stdout (`--json`): every string scrubbed of
    secrets; JSON itself escapes control characters (and everything beyond
    ASCII), so it never carries a raw one."""
    text = json.dumps(scrub_doc(doc), indent=1, default=str)
    with _lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def plural(n: int, word: str, many: str | None = None) -> str:
    """A count as English says it: "1 file", "2 files", "0 files"; `many`
    for a plural that is not word + "s" ("process", "processes")."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


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


def chart(lines: Iterable[Sequence[tuple[str, str]]], *, width: int | None = None) -> None:
    """Styled lines (`ckpt timeline`) on stdout: each line is (text, style)
    segments, every text cleaned and taken as plain text (never markup), a
    style a rich style string; colours only on a terminal (and not with
    NO_COLOR). One line stays one line (no wrapping)."""
    rendered = []
    for segments in lines:
        line = _text(no_wrap=True, overflow="crop")
        for text, style in segments:
            line.append(clean(text), style=style or "")
        rendered.append(line)
    with _lock:
        c = _console_class()(
            soft_wrap=True, highlight=False, no_color="NO_COLOR" in os.environ, width=width
        )
        for line in rendered:
            c.print(line)


def width() -> int:
    """The columns of the terminal stdout goes to (100 off a terminal)."""
    import shutil

    return shutil.get_terminal_size((100, 24)).columns if sys.stdout.isatty() else 100
