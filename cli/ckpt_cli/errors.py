"""Expected errors and the one funnel that turns any exception into what the user sees.

Imports: standard library, the shim's contract, and `console` for printing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from ckpt._contract import ExitCode
from ckpt_cli import __version__, console
from ckpt_cli.redact import scrub


class CkptError(Exception):
    """An expected failure: one line for the user, and the exit status to use."""

    exit_code: int = ExitCode.CONFIG

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(CkptError):
    """A flag, path or repository ckpt will not use as given."""

    exit_code = ExitCode.CONFIG


class RemoteError(CkptError):
    """The remote could not be read or written (after retries)."""

    exit_code = ExitCode.UNAVAILABLE


class LeaseHeldError(CkptError):
    """Another live writer holds the repository's lease."""

    exit_code = ExitCode.UNAVAILABLE


class RestoreError(CkptError):
    """No usable snapshot could be materialised; the local directory is untouched."""

    exit_code = ExitCode.UNAVAILABLE


class Stopped(BaseException):
    """A stop signal (SIGTERM, SIGINT, SIGHUP) arrived before the child was
    launched: whatever was under way (opening the remote, a restore) is
    abandoned the way an exception unwinds, so temp dirs are removed and the
    lease released. A BaseException, so no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def state_dir() -> Path:
    """Where ckpt keeps crash logs: $XDG_STATE_HOME/ckpt (default ~/.local/state/ckpt)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "ckpt"


def write_crash_log(exc: BaseException) -> Path | None:
    """Write versions, platform and traceback to a fresh file; return its path."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    try:
        directory = state_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"crash-{stamp}-{os.getpid()}.log"
        lines = [
            f"ckpt {__version__}",
            f"python {sys.version.split()[0]} on {platform.platform()}",
            f"argv: {_redacted_argv()}",
            "",
            "".join(traceback.format_exception(exc)),
        ]
        path.write_text(scrub("\n".join(lines)), encoding="utf-8")
        return path
    except OSError:
        return None


def _redacted_argv() -> str:
    """argv with --storage-option/-o values hidden (they often carry secrets);
    the child's own arguments after `--` are left as they are."""
    out: list[str] = []
    hide_next = False
    for i, arg in enumerate(sys.argv):
        if arg == "--":
            out.extend(sys.argv[i:])
            break
        if hide_next:
            out.append(f"{arg.split('=', 1)[0]}=***")
            hide_next = False
        elif arg in ("--storage-option", "-o"):
            out.append(arg)
            hide_next = True
        elif arg.startswith("--storage-option="):
            key = arg.split("=", 2)[1]
            out.append(f"--storage-option={key}=***")
        else:
            out.append(arg)
    return " ".join(out)  # write_crash_log scrubs the whole text


@contextlib.contextmanager
def error_funnel() -> Iterator[list[int]]:
    """Run a command body; set the exit status in the yielded one-item list.

    CkptError -> its one line and exit code; Ctrl-C -> "Interrupted", 130;
    a stop signal before the child started -> one line, 128+N; anything else
    -> "unexpected error", a crash log, exit 70.
    """
    status = [0]
    try:
        yield status
    except CkptError as exc:
        console.error(str(exc))
        status[0] = exc.exit_code
    except Stopped as exc:
        name = signal.Signals(exc.signum).name
        console.error(
            f"stopped by {name} before the child started "
            "(an unfinished restore leaves the directory as it was)"
        )
        status[0] = 128 + exc.signum
    except KeyboardInterrupt:
        console.error("Interrupted")
        status[0] = ExitCode.SIGINT
    except Exception as exc:
        log = write_crash_log(exc)
        where = f"; details in {log}" if log else ""
        console.error(f"unexpected error: {type(exc).__name__}: {exc}{where}")
        status[0] = ExitCode.SOFTWARE
