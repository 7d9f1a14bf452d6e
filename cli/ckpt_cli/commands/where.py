"""Where a command other than `ckpt run` works: which positional argument is
which (`place`), and the remote and --dir it finds as `ckpt run` finds its
own (`locate`), said on a terminal when it was not named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckpt_cli import config, console
from ckpt_cli.config import Location


def locate(flags: dict[str, Any], *, writer: bool = False, names: tuple[str, ...] = ()) -> Location:
    """The remote (config.Location) of a command other than `ckpt run`, from
    the flags given (None: not given) and the sources `ckpt run` reads; said
    on a terminal when it was not named on the command line, and with
    --verbose (a debug line) always. Never on stdout, which may be JSON."""
    given = {k: v for k, v in flags.items() if v is not None and v != []}
    where = config.locate(given, writer=writer, names=names)
    if not where.given and console.is_terminal():
        console.info(where.describe())
    else:
        console.debug(where.describe())
    return where


def place(
    command: str,
    slots: tuple[str, ...],
    values: list[str] | None,
    *,
    taken: dict[str, object],
    required: tuple[str, ...] = (),
) -> dict[str, str]:
    flags = tuple(name for name, value in taken.items() if value is not None)
    return config.place(command, slots, values or [], taken=flags, required=required)


def reader(
    command: str,
    remote_arg: str | None,
    remote: str | None,
    dir: Path | None,
    storage_option: list[str] | None,
) -> Location:
    """The Location of a command whose only positional argument is REMOTE."""
    if remote_arg is not None and remote is not None:
        place(command, ("remote",), [remote_arg], taken={"remote": remote})
    return locate({"remote": remote_arg or remote, "dir": dir, "storage_option": storage_option})
