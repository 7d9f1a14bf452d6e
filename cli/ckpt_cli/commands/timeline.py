"""`ckpt timeline`: a run on a time axis, in the terminal or as one
self-contained .html or .svg file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli import console
from ckpt_cli.commands.where import reader
from ckpt_cli.errors import ConfigError
from ckpt_cli.history import load_runs
from ckpt_cli.repo_tools import open_existing


def timeline(
    remote: str,
    options: dict[str, Any],
    *,
    run: str | None = None,
    out: Path | None = None,
    rank: int | None = None,
) -> int:
    """Draw a run and the failed runs it continued: in the terminal, or as
    one self-contained SVG or HTML file (`out`, by its extension)."""
    from ckpt_cli import timeline as chart
    from ckpt_cli import timeline_file

    kind = None if out is None else timeline_file.kind_of(out.name)
    if out is not None:
        if kind is None:
            raise ConfigError(f"--out {out}: name a .html or .svg file (the extension says which)")
        if not out.parent.is_dir():
            raise ConfigError(f"--out {out}: the directory {out.parent} does not exist")
        if out.is_dir():
            raise ConfigError(f"--out {out} is a directory: name a .html or .svg file in it")
    repo = open_existing(remote, options)
    records = load_runs(repo.backend) if repo is not None else []
    if not records:
        console.info(f"{remote} has no run history yet (only `ckpt run` writes one)")
        return ExitCode.OK
    _, runs = chart.choose(records, run, rank)
    now = time.time()
    if out is None or kind is None:
        chart.show(runs, now, console.width())
        return ExitCode.OK
    text = timeline_file.render(runs, now, kind)
    tmp = out.with_name(f".{out.name}.ckpt-{secrets.token_hex(4)}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"--out {out}: {exc.strerror or exc}") from None
    attempts = sum(len(r.attempts) for r in runs)
    console.info(
        f"timeline of {console.plural(len(runs), 'run')} "
        f"({console.plural(attempts, 'attempt')}) written to {out}"
    )
    return ExitCode.OK


def main(
    remote_arg: str | None,
    *,
    run: str | None,
    out: Path | None,
    remote: str | None,
    dir: Path | None,
    storage_option: list[str] | None,
    rank: int | None,
) -> int:
    """`ckpt timeline [REMOTE]`."""
    where = reader("timeline", remote_arg, remote, dir, storage_option)
    return timeline(where.remote, where.storage_options, run=run, out=out, rank=rank)
