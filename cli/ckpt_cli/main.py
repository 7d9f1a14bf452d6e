"""The command line: parse, validate, dispatch. Thin on purpose; every command
body runs inside the one error funnel. Heavy modules (fsspec, watchdog, rich
tables) are imported by the commands that need them, not at start-up.
"""

from __future__ import annotations

import atexit
import importlib
import inspect
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from ckpt._contract import ExitCode
from ckpt_cli import __version__, console, options
from ckpt_cli.errors import error_funnel, stdout_closed

app = typer.Typer(
    name="ckpt",
    help="Make any long-running training script fault tolerant: restore its checkpoint "
    "directory, upload what changes, restart it when it fails.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

#: Where the other commands find their remote when none is named: the same
#: sources as `ckpt run` (config.locate), said in every command's help.
WHICH_REMOTE = (
    "REMOTE: a path, file://, s3://, gs://, az://, sftp://, memory://; default: --remote, "
    "else CKPT_REMOTE, else remote in ckpt.toml ([tool.ckpt] in pyproject.toml), else the "
    "embedded store of --dir (what `ckpt run` uses when given no remote)."
)
RemoteOpt = Annotated[
    str | None,
    typer.Option(
        "--remote",
        metavar="URL",
        show_default=False,
        help="Repository URL, as the REMOTE argument gives it (env CKPT_REMOTE, ckpt.toml).",
    ),
]
DirOpt = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        "-d",
        metavar="DIR",
        show_default=False,
        help="Checkpoint directory, whose embedded store is the remote when none is named "
        "(env CKPT_DIR, ckpt.toml; default ./checkpoints).",
    ),
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Say which remote is used, also off a terminal.")
]
StorageOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--storage-option",
        "-o",
        metavar="KEY=VALUE",
        help="fsspec option for the remote (repeatable; VALUE may be JSON).",
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ckpt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """ckpt: checkpoints that survive crashes, restarts and preemptions."""


def _from_command_line(ctx: typer.Context) -> dict[str, Any]:
    """The options of `ckpt run` given on the command line (not defaults):
    config.load puts them above env vars, config files and defaults."""
    return {
        name: value
        for name, value in ctx.params.items()
        if name != "print_config"
        and (source := ctx.get_parameter_source(name)) is not None
        and source.name == "COMMANDLINE"
    }


def run(ctx: typer.Context, **given: Any) -> None:
    """Run COMMAND under supervision: restore --dir, snapshot it as it changes,
    restart COMMAND on recoverable exits.

    Every option can also be set by an env var CKPT_<OPTION> (CKPT_RETRIES=5,
    CKPT_IO_TIMEOUT=60) or in ckpt.toml ([tool.ckpt] in pyproject.toml), in the
    working directory; flags win over env vars, env vars over the file.

    Example: ckpt run --retries 3 --dir ./checkpoints --remote s3://b/run -- python train.py
    """
    console.configure(quiet=given["quiet"], verbose=given["verbose"])  # until files are read
    with error_funnel() as status:
        from ckpt_cli.commands import run as run_command

        status[0] = run_command.main(_from_command_line(ctx), print_config=given["print_config"])
    raise typer.Exit(status[0])


def _parameter(opt: options.Option) -> inspect.Parameter:
    """The typer parameter of one declared option of `ckpt run`."""
    python_type: Any = {"int": int, "float": float, "bool": bool, "str": str}.get(opt.kind)
    default = opt.default
    if opt.path:
        python_type = Path
        default = None if default is None else Path(default)
    if opt.kind in ("list", "table"):
        python_type, default = list[str] | None, None  # repeated; None: not given
    elif opt.optional:
        python_type = python_type | None
    info: Any = (
        typer.Argument(help=opt.help, show_default=opt.show_default)
        if opt.argument
        else typer.Option(
            *opt.flag_names,
            help=opt.help,
            metavar=opt.metavar,
            show_default=opt.show_default,
            min=opt.min,
            max=opt.max,
        )
    )
    return inspect.Parameter(
        opt.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[python_type, info],
    )


#: `ckpt run` takes the declared options (options.DECLARED), the command
#: first, and --print-config, which only the command line gives.
run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        *(_parameter(opt) for opt in options.DECLARED if opt.argument),
        *(_parameter(opt) for opt in options.DECLARED if not opt.argument),
        inspect.Parameter(
            "print_config",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[
                bool,
                typer.Option(
                    "--print-config",
                    help="Print every option's value and where it came from (as ckpt.toml "
                    "lines); run nothing.",
                ),
            ],
        ),
    ]
)
app.command(context_settings={"allow_interspersed_args": False})(run)


@app.command("restore")
def restore_cmd(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[REMOTE] [DIR]",
            show_default=False,
            help="The remote, then the directory to restore into (default: --dir). " + WHICH_REMOTE,
        ),
    ] = None,
    remote: RemoteOpt = None,
    dir: DirOpt = None,
    snapshot: Annotated[
        str | None,
        typer.Option(
            help="Snapshot id, unique id prefix (4+ characters) or generation (default: the "
            "newest usable one)."
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace the contents of a DIR that is not empty."),
    ] = False,
    storage_option: StorageOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    verbose: VerboseOpt = False,
    rank: Annotated[
        int | None,
        typer.Option(
            min=0,
            show_default=False,
            help="Restore this rank's files of the newest step all ranks committed "
            "(with --world-size).",
        ),
    ] = None,
    world_size: Annotated[
        int | None,
        typer.Option(
            min=1, max=options.MAX_WORLD, show_default=False, help="The job's number of nodes."
        ),
    ] = None,
    allow_world_change: Annotated[
        bool,
        typer.Option(
            "--allow-world-change", help="Restore what a job of another --world-size wrote."
        ),
    ] = False,
) -> None:
    """Restore a snapshot into DIR (verified, swapped in atomically).

    With no arguments, the remote `ckpt run` would use is restored into
    --dir (./checkpoints). A DIR that is not empty is refused without
    --force; with it, DIR keeps its old contents until the whole snapshot is
    in place, then one rename swaps them; files in no restorable snapshot
    are moved aside, never deleted.

    Example: ckpt restore s3://b/run ./checkpoints --snapshot 12 --force (or, after a
    `ckpt run` in this directory, plain `ckpt restore`)
    """
    console.configure(quiet=quiet, verbose=verbose)
    with error_funnel() as status:
        from ckpt_cli.commands import restore

        status[0] = restore.main(
            args,
            remote=remote,
            dir=dir,
            snapshot=snapshot,
            force=force,
            storage_option=storage_option,
            rank=rank,
            world_size=world_size,
            allow_world_change=allow_world_change,
        )
    raise typer.Exit(status[0])


@app.command()
def push(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[DIR] [REMOTE]",
            show_default=False,
            help="The directory to snapshot (default: --dir), then the remote. " + WHICH_REMOTE,
        ),
    ] = None,
    remote: RemoteOpt = None,
    dir: DirOpt = None,
    keep: Annotated[
        int | None,
        typer.Option(
            min=1,
            show_default=False,
            help="Restorable snapshots kept in the remote; older ones are deleted "
            "(env CKPT_KEEP, ckpt.toml; default 3, as for ckpt run).",
        ),
    ] = None,
    storage_option: StorageOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    verbose: VerboseOpt = False,
    allow_empty: Annotated[
        bool,
        typer.Option(
            "--allow-empty",
            help="Push an empty DIR even though the newest snapshot holds files.",
        ),
    ] = False,
    check: Annotated[
        list[str] | None,
        typer.Option("--check", metavar="GLOB=COMMAND", help=options.BY_NAME["check"].help),
    ] = None,
    check_timeout: Annotated[
        float | None,
        typer.Option(
            min=options.BY_NAME["check_timeout"].min,
            max=options.BY_NAME["check_timeout"].max,
            show_default=False,
            help="Seconds a --check command may take (else: not whole; default 60).",
        ),
    ] = None,
    no_format_checks: Annotated[
        bool,
        typer.Option(
            "--no-format-checks",
            help=options.BY_NAME["no_format_checks"].help
            + " A file that fails them is then pushed as it is.",
        ),
    ] = False,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude",
            metavar="GLOB",
            help=options.BY_NAME["exclude"].help + " (env CKPT_EXCLUDE, ckpt.toml, as for run)",
        ),
    ] = None,
) -> None:
    """Take one snapshot of DIR now (same code path as `ckpt run`), then keep
    the newest --keep restorable snapshots (3) and delete older ones.

    With no arguments, --dir (./checkpoints) goes to the remote `ckpt run`
    would use (its embedded store when none is named). An empty DIR over a
    remote whose newest snapshot holds files is refused without
    --allow-empty. The whole directory, whole, or nothing: a file that fails
    its format check, or keeps changing while it is read, refuses the push
    (65) and nothing is written.

    Example: ckpt push ./checkpoints s3://b/run (or plain `ckpt push`)
    """
    console.configure(quiet=quiet, verbose=verbose)
    with error_funnel() as status:
        from ckpt_cli.commands import push

        status[0] = push.main(
            args,
            remote=remote,
            dir=dir,
            keep=keep,
            storage_option=storage_option,
            allow_empty=allow_empty,
            check=check,
            check_timeout=check_timeout,
            no_format_checks=no_format_checks,
            exclude=exclude,
        )
    raise typer.Exit(status[0])


#: The REMOTE argument of the reading commands (optional: see WHICH_REMOTE).
RemoteArg = Annotated[
    str | None, typer.Argument(metavar="[REMOTE]", show_default=False, help=WHICH_REMOTE)
]


@app.command("ls")
def ls_cmd(
    remote_arg: RemoteArg = None,
    json_out: Annotated[
        bool,
        typer.Option("--json", help="One JSON document on stdout (snapshots and runs)."),
    ] = False,
    runs: Annotated[
        bool,
        typer.Option(
            "--runs", help="List the run history (hosts, attempts, exits, preemptions) instead."
        ),
    ] = False,
    remote: RemoteOpt = None,
    dir: DirOpt = None,
    storage_option: StorageOpt = None,
    rank: Annotated[
        int | None,
        typer.Option(
            min=0, show_default=False, help="List this rank's snapshots (a multi-node job's)."
        ),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """List snapshots, newest first (or, with --runs, the runs that wrote them).

    Each row: id, generation, time, age, files, size, bytes new in it, attempt,
    host, checks and state. checks: verified (no file was in progress when it
    was taken), unverified (taken anyway after the settle timeout) or "-"
    (taken before ckpt checked). "newest" marks the snapshot `ckpt restore`
    and `ckpt run` start from (the newest complete one that is verified or
    unchecked and not suspect); "damaged" ones (a manifest that does not
    parse, chunks missing from the one listing of chunks/) are skipped by
    them, unverified ones and those the crash-loop guard marked "suspect"
    only used when nothing else can be (`ckpt unsuspect` clears a mark).
    Chunks are not re-hashed here: `ckpt verify --full` re-hashes them, and a
    restore skips a snapshot whose chunk turns out corrupt. There is no "kept"
    mark: --keep is a flag of each writer (`ckpt run`, `push`), not stored, so
    every snapshot listed is one the last retention kept; `ckpt gc --keep N
    --dry-run` shows what N would drop. An empty location lists nothing (exit 0).

    A multi-node job's remote: the steps complete on all ranks, with each
    rank's count; --rank R lists rank R's snapshots.

    Example: ckpt ls s3://b/run (or, after a `ckpt run` in this directory, plain
    `ckpt ls`; `ckpt ls --dir ck` for its --dir ck)
    """
    console.configure(verbose=verbose)
    with error_funnel() as status:
        from ckpt_cli.commands import ls

        status[0] = ls.main(
            remote_arg,
            json_out=json_out,
            runs=runs,
            remote=remote,
            dir=dir,
            storage_option=storage_option,
            rank=rank,
        )
    raise typer.Exit(status[0])


@app.command("timeline")
def timeline_cmd(
    remote_arg: RemoteArg = None,
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            metavar="ID",
            show_default=False,
            help="The run to draw: its id or 4+ of its first characters (default: the newest).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="FILE",
            show_default=False,
            help="Write one self-contained .html or .svg file instead of drawing in the terminal.",
        ),
    ] = None,
    remote: RemoteOpt = None,
    dir: DirOpt = None,
    storage_option: StorageOpt = None,
    rank: Annotated[
        int | None,
        typer.Option(min=0, show_default=False, help="The newest run of this rank (multi-node)."),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Draw a run on a time axis: attempts as bars, snapshots as ticks, preemption
    notices and failures as marks, the work each failure lost shaded, the time
    to resume dotted; with the failed runs it continued (a preempted run before
    its successor), and a table of the attempts. --out FILE writes it as one
    HTML or SVG file to attach to a bug report (nothing in it is fetched).

    Example: ckpt timeline (the newest run of the remote `ckpt run` uses here),
    ckpt timeline s3://b/run --out timeline.html
    """
    console.configure(verbose=verbose)
    with error_funnel() as status:
        from ckpt_cli.commands import timeline

        status[0] = timeline.main(
            remote_arg,
            run=run,
            out=out,
            remote=remote,
            dir=dir,
            storage_option=storage_option,
            rank=rank,
        )
    raise typer.Exit(status[0])


@app.command("unsuspect")
def unsuspect_cmd(
    args: Annotated[
        list[str],
        typer.Argument(
            metavar="[REMOTE] SNAPSHOT",
            show_default=False,
            help="The remote, then the snapshot: id, unique id prefix (4+ characters) or "
            "generation. " + WHICH_REMOTE,
        ),
    ],
    remote: RemoteOpt = None,
    dir: DirOpt = None,
    storage_option: StorageOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Clear the crash-loop guard's mark of a snapshot, so that `ckpt restore`
    and `ckpt run` may pick it again (`ckpt ls` shows the marks). A
    snapshot without a mark is left as it is.

    Example: ckpt unsuspect s3://b/run 12 (or `ckpt unsuspect 12`)
    """
    console.configure(verbose=verbose)
    with error_funnel() as status:
        from ckpt_cli.commands import unsuspect

        status[0] = unsuspect.main(args, remote=remote, dir=dir, storage_option=storage_option)
    raise typer.Exit(status[0])


SnapshotOpt = Annotated[
    str | None,
    typer.Option(
        "--snapshot",
        help="Snapshot id, unique id prefix (4+ characters) or generation (default: every one).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]


@app.command("show")
def show_cmd(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[REMOTE] [SNAPSHOT]",
            show_default=False,
            help="The remote, then the snapshot: id, unique id prefix (4+ characters) or "
            "generation (default: the newest). One argument that reads as a snapshot "
            "(digits, or 4 to 8 hex digits) and is no path here is the snapshot. " + WHICH_REMOTE,
        ),
    ] = None,
    json_out: JsonOpt = False,
    remote: RemoteOpt = None,
    dir: DirOpt = None,
    storage_option: StorageOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """List the files of one snapshot: path, type, mode, size, chunks, mtime.

    Example: ckpt show s3://b/run 12 (or `ckpt show 12` of the remote found as
    `ckpt run` finds it)
    """
    console.configure(verbose=verbose)
    with error_funnel() as status:
        from ckpt_cli.commands import show

        status[0] = show.main(
            args, json_out=json_out, remote=remote, dir=dir, storage_option=storage_option
        )
    raise typer.Exit(status[0])


@app.command("diff")
def diff_cmd(
    args: Annotated[
        list[str],
        typer.Argument(
            metavar="[REMOTE] A B",
            show_default=False,
            help="The remote, then the older snapshot A and the newer B (id, unique id "
            "prefix of 4+ characters, or generation). " + WHICH_REMOTE,
        ),
    ],
    json_out: JsonOpt = False,
    remote: RemoteOpt = None,
    dir: DirOpt = None,
    storage_option: StorageOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Show what changed from snapshot A to B: files added, removed and changed
    (content, size, mode, symlink target; not mtimes).

    Example: ckpt diff s3://b/run 11 12 (or `ckpt diff 11 12`)
    """
    console.configure(verbose=verbose)
    with error_funnel() as status:
        from ckpt_cli.commands import diff

        status[0] = diff.main(
            args, json_out=json_out, remote=remote, dir=dir, storage_option=storage_option
        )
    raise typer.Exit(status[0])


@app.command("verify")
def verify_cmd(
    remote_arg: RemoteArg = None,
    snapshot: SnapshotOpt = None,
    full: Annotated[
        bool,
        typer.Option("--full", help="Also read and re-hash every chunk (a few at a time)."),
    ] = False,
    json_out: JsonOpt = False,
    remote: RemoteOpt = None,
    dir: DirOpt = None,
    storage_option: StorageOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Check that every manifest parses and every chunk it names exists (one
    listing), and that every stored file and checkpoint directory passes its
    format check (reading only the chunks the check needs, each verified by
    its hash); --full also re-hashes every chunk. Damaged snapshots are
    listed with what is wrong, and the exit status is 65.

    Example: ckpt verify s3://b/run --full (or `ckpt verify --full`)
    """
    console.configure(verbose=verbose)
    with error_funnel() as status:
        from ckpt_cli.commands import verify

        status[0] = verify.main(
            remote_arg,
            snapshot=snapshot,
            full=full,
            json_out=json_out,
            remote=remote,
            dir=dir,
            storage_option=storage_option,
        )
    raise typer.Exit(status[0])


@app.command("gc")
def gc_cmd(
    keep: Annotated[
        int,
        typer.Option(min=1, show_default=False, help="Restorable snapshots to keep, newest first."),
    ],
    remote_arg: RemoteArg = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be deleted; change nothing.")
    ] = False,
    json_out: JsonOpt = False,
    remote: RemoteOpt = None,
    dir: DirOpt = None,
    storage_option: StorageOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Keep the newest --keep restorable snapshots (and damaged ones newer
    than them, for inspection; a damaged one never counts), delete the
    older ones, then every chunk no kept snapshot names and the
    half-written objects of killed writers; say what was freed. Takes the
    writer lease like `ckpt push` (refused while a run holds it);
    --dry-run runs the same code without deleting and needs no lease. The
    run history (runs/) is kept.

    Example: ckpt gc s3://b/run --keep 2 --dry-run (or `ckpt gc --keep 2 --dry-run`)
    """
    console.configure(verbose=verbose)
    with error_funnel() as status:
        from ckpt_cli.commands import gc

        status[0] = gc.main(
            remote_arg,
            keep=keep,
            dry_run=dry_run,
            json_out=json_out,
            remote=remote,
            dir=dir,
            storage_option=storage_option,
        )
    raise typer.Exit(status[0])


@app.command()
def commit(
    socket: Annotated[
        str | None,
        typer.Option(envvar="CKPT_SOCKET", help="Control socket of the running supervisor."),
    ] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once queued.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(min=0, max=options.MAX_SECONDS, help="Seconds to wait for durability."),
    ] = None,
    step: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=options.MAX_STEP,
            show_default=False,
            help="The training step of this checkpoint: on several nodes, each rank restores "
            "the newest step every rank committed.",
        ),
    ] = None,
) -> None:
    """Ask the running supervisor for a snapshot now; wait until it is durable.

    Example (inside a script run by ckpt run): ckpt commit --step 1200
    """
    with error_funnel() as status:
        from ckpt_cli.commands import commit as command

        status[0] = command.commit(socket, not no_wait, timeout, step)
    raise typer.Exit(status[0])


@app.command("signal")
def signal_cmd(
    socket: Annotated[
        str | None,
        typer.Option(
            envvar="CKPT_SOCKET",
            help="Control socket of the supervisor (inside its child: CKPT_SOCKET; default: "
            "the running `ckpt run` of this user on this machine).",
        ),
    ] = None,
    dir: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            "-d",
            metavar="DIR",
            show_default=False,
            help="When several `ckpt run` are running: the one protecting DIR (env CKPT_DIR, "
            "ckpt.toml).",
        ),
    ] = None,
) -> None:
    """Tell the supervised script to checkpoint soon (sends --checkpoint-signal).

    Example (from another shell): ckpt signal --dir ./checkpoints
    """
    with error_funnel() as status:
        from ckpt_cli.commands import signal

        status[0] = signal.main(socket, dir)
    raise typer.Exit(status[0])


@app.command("shell-shim")
def shell_shim(
    path: Annotated[bool, typer.Option("--path", help="Print the file's path instead.")] = False,
) -> None:
    """Print the bash shim (ckpt_commit, ckpt_write, ckpt_preemption_requested, ...).

    Example (in a bash training script): source "$(ckpt shell-shim --path)"
    """
    with error_funnel() as status:
        from ckpt_cli.commands import shell_shim as command

        status[0] = command.main(path)
    raise typer.Exit(status[0])


@app.command("status")
def status_cmd(
    socket: Annotated[
        str | None,
        typer.Option(
            envvar="CKPT_SOCKET",
            help="Control socket of one supervisor (default: every `ckpt run` of this "
            "user on this machine).",
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
) -> None:
    """Show the live state of running supervisors: child pid, attempt, newest
    durable snapshot and its age, upload backlog and throughput.

    Example (from another shell): ckpt status
    """
    with error_funnel() as status:
        from ckpt_cli.commands import status as command

        status[0] = command.status(socket, json_out)
    raise typer.Exit(status[0])


def _click_exceptions() -> Any:
    """The click exceptions typer raises: typer >= 0.20 carries its own copy of
    click (typer._click), older ones use click itself."""
    try:
        return importlib.import_module("typer._click.exceptions")
    except ImportError:
        return importlib.import_module("click.exceptions")


def main() -> int:
    """Run the command line; return the exit status. A command line that
    cannot be parsed (an unknown flag, a value out of range) is one
    `ckpt: error:` line naming the flag, exit 2, like every other error;
    plain `ckpt` prints the help."""
    ex = _click_exceptions()
    try:
        status = app(standalone_mode=False)
    except BrokenPipeError:  # `ckpt --help | head -1`
        return stdout_closed()
    except ex.NoArgsIsHelpError as exc:
        exc.show()
        return ExitCode.USAGE
    except ex.UsageError as exc:
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        console.error(f"{exc.format_message().rstrip('.')}{where}")
        return ExitCode.USAGE
    except ex.ClickException as exc:
        console.error(exc.format_message())
        return int(exc.exit_code)
    except typer.Abort:
        console.error("Interrupted")
        return ExitCode.SIGINT
    return leave(status if isinstance(status, int) else 0)


def leave(status: int) -> int:
    """Exit with status at once, skipping the interpreter's teardown (module
    by module, every object freed: 0.05-0.3 s of a short command's time,
    findings item 4) once nothing is left to do: output flushed, the atexit
    functions run, no other non-daemon thread alive. Otherwise return status
    for the usual exit."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return status  # a closed stream: the usual exit reports it
    main = threading.main_thread()
    if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return status
    atexit._run_exitfuncs()
    os._exit(status)
