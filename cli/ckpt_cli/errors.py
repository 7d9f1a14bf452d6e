"""Expected errors and the one funnel that turns any exception into what the user sees."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import signal
import stat
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
    """Write versions, platform and traceback to a fresh file; return its path.
    Private: the file is 0600 in a 0700 directory (a traceback shows paths,
    arguments and whatever a library put in its message), created anew and
    never through a symlink."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    try:
        directory = state_dir()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = directory.lstat()
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077:
            directory.chmod(0o700)  # made by an older ckpt, 0755
        path = directory / f"crash-{stamp}-{os.getpid()}.log"
        lines = [
            f"ckpt {__version__}",
            f"python {sys.version.split()[0]} on {platform.platform()}",
            f"argv: {_redacted_argv(sys.argv)}",
            "",
            "".join(traceback.format_exception(exc)),
        ]
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(scrub("\n".join(lines)))
        return path
    except OSError:
        return None


#: Short flags of ckpt's commands that take a value (`-d DIR`, `-o KEY=VALUE`):
#: in `-qoKEY=VALUE` everything after one of them is its value.
_SHORT_WITH_VALUE = frozenset("do")


def _redacted_argv(argv: list[str]) -> str:
    """argv with --storage-option/-o values hidden (they often carry secrets),
    in every form click takes: `-o K=V`, `-oK=V`, `-qoK=V`, `-qo K=V`,
    `--storage-option K=V`, `--storage-option=K=V`; the child's own arguments
    after `--` are left as they are."""
    out: list[str] = []
    hide_next = False
    for i, arg in enumerate(argv):
        if arg == "--":
            out.extend(argv[i:])
            break
        if hide_next:
            out.append(_hidden(arg))
            hide_next = False
        elif arg == "--storage-option":
            out.append(arg)
            hide_next = True
        elif arg.startswith("--storage-option="):
            out.append(f"--storage-option={_hidden(arg.partition('=')[2])}")
        elif arg.startswith("-") and not arg.startswith("--") and len(arg) > 1:
            shown, hide_next = _short_flags(arg)
            out.append(shown)
        else:
            out.append(arg)
    return " ".join(out)  # write_crash_log scrubs the whole text


def _short_flags(arg: str) -> tuple[str, bool]:
    """A cluster of short flags: (what to show, whether the next arg is -o's value)."""
    for j, ch in enumerate(arg[1:], start=1):
        if ch in _SHORT_WITH_VALUE:
            value = arg[j + 1 :]
            if ch != "o":
                return arg, False
            if not value:
                return arg, True
            return f"{arg[: j + 1]}{_hidden(value)}", False
    return arg, False


def _hidden(item: str) -> str:
    """KEY=VALUE as KEY=*** (the key says what it was; the value may be a secret)."""
    return f"{item.split('=', 1)[0]}=***"


#: The exit status of a command whose reader went away: 128 + SIGPIPE, as a
#: tool killed by the signal gives (`ls | head` leaves ls with 141).
PIPE_CLOSED = 128 + signal.SIGPIPE


def stdout_closed() -> int:
    """stdout's reader went away: point stdout at /dev/null (so the flush at
    exit cannot fail again and print "Exception ignored") and say nothing;
    the exit status for it."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return PIPE_CLOSED


@contextlib.contextmanager
def error_funnel() -> Iterator[list[int]]:
    """Run a command body; set the exit status in the yielded one-item list.

    CkptError -> its one line and exit code; Ctrl-C -> "Interrupted", 130;
    a stop signal before the child started -> one line, 128+N; stdout closed
    by its reader (`| head`) -> nothing more, 141 (what a tool killed by
    SIGPIPE gives); anything else -> "unexpected error", a crash log, exit 70.
    """
    status = [0]
    try:
        yield status
    except BrokenPipeError:
        status[0] = stdout_closed()
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
