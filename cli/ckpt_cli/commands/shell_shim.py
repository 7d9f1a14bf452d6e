"""`ckpt shell-shim`: print the bash shim, or its path."""

from __future__ import annotations

import typer

from ckpt._contract import ExitCode


def main(path: bool) -> int:
    from ckpt import SHELL_SHIM

    if path:
        typer.echo(str(SHELL_SHIM))
    else:
        typer.echo(SHELL_SHIM.read_text(), nl=False)
    return ExitCode.OK
