"""`ckpt run`: settle the options from their four sources, then print them
(--print-config) or hand them to the Supervisor.
"""

from __future__ import annotations

from typing import Any

import typer

from ckpt_cli import config, console


def main(flags: dict[str, Any], *, print_config: bool) -> int:
    """`flags`: the options given on the command line (not defaults), which
    config.load puts above env vars, config files and defaults."""
    settings = config.load(flags)
    console.configure(quiet=settings["quiet"], verbose=settings["verbose"])
    for note in settings.notes:
        console.info(note)
    cfg = config.run_config(settings, need_command=not print_config)
    if print_config:
        typer.echo(config.describe(settings, cfg))
        return 0
    from ckpt_cli.run.supervisor import Supervisor

    return Supervisor(cfg).run()
