"""One module per command of the command line (`main` wires them to typer):
each takes what the command line gave, finds its remote (`where`), and
returns an exit status; a command's output (tables, --json) goes to stdout,
ckpt's own lines through `console`. Imported only by the command that runs,
so `ckpt --help` loads none of them.
"""
