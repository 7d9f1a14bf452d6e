"""The command line: parse, validate, dispatch. Thin on purpose; every command
body runs inside the one error funnel. Heavy modules (fsspec, watchdog, rich
tables) are imported by the commands that need them, not at start-up.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any

import typer

from ckpt._contract import ExitCode
from ckpt_cli import __version__, console
from ckpt_cli.errors import error_funnel, stdout_closed

#: config.MAX_SECONDS, the most seconds a duration option takes (a test
#: checks that the flags' ranges are the config table's); not imported from
#: config, which would load every command's modules at start-up.
MAX_SECONDS = 30 * 86400.0

app = typer.Typer(
    name="ckpt",
    help="Make any long-running training script fault tolerant: restore its checkpoint "
    "directory, upload what changes, restart it when it fails.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

RemoteArg = Annotated[
    str,
    typer.Argument(
        help="Repository URL: a path, file://, s3://, gs://, az://, sftp://, memory://."
    ),
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


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    ctx: typer.Context,
    command: Annotated[
        list[str] | None,
        typer.Argument(
            help="The command to supervise, after -- (or `command = [...]` in ckpt.toml).",
            show_default=False,
        ),
    ] = None,
    dir: Annotated[
        Path, typer.Option("--dir", "-d", help="Checkpoint directory to protect.")
    ] = Path("checkpoints"),
    remote: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Repository URL (s3://bucket/prefix, gs://, az://, sftp://, a path). "
            "Default: an embedded local store under ~/.local/share/ckpt.",
        ),
    ] = None,
    storage_option: StorageOpt = None,
    retries: Annotated[int, typer.Option(min=0, help="Relaunches after recoverable exits.")] = 3,
    crash_loop: Annotated[
        int,
        typer.Option(
            min=0,
            metavar="N",
            help="After N failures in a row right after a restore (no newer snapshot), mark "
            "that snapshot suspect and relaunch on the one before it; 0: off.",
        ),
    ] = 2,
    retry_on: Annotated[
        str,
        typer.Option(
            help="Exit codes and signal names that are recoverable; 'signals' = death by any "
            "signal but SIGINT; 'any'; 'none'."
        ),
    ] = "75,signals",
    backoff: Annotated[
        str,
        typer.Option(
            metavar="INITIAL[:MAX]",
            help="Seconds before a relaunch: doubles each retry, with jitter, capped.",
        ),
    ] = "1:60",
    grace: Annotated[
        float,
        typer.Option(
            min=0,
            max=MAX_SECONDS,
            help="Seconds between forwarding SIGTERM/SIGINT/SIGHUP and SIGKILL.",
        ),
    ] = 30.0,
    debounce: Annotated[
        float,
        typer.Option(
            min=0, max=MAX_SECONDS, help="Quiet seconds after the last change before a snapshot."
        ),
    ] = 2.0,
    rescan: Annotated[
        float,
        typer.Option(
            min=1,
            max=MAX_SECONDS,
            help="Seconds between safety-net rescans when no event arrives.",
        ),
    ] = 30.0,
    keep: Annotated[int, typer.Option(min=1, help="Snapshots kept in the remote.")] = 3,
    no_restore: Annotated[
        bool, typer.Option("--no-restore", help="Start from --dir as it is.")
    ] = False,
    snapshot: Annotated[
        str | None,
        typer.Option(help="Restore this snapshot (id or generation) instead of the newest."),
    ] = None,
    flush_timeout: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds to wait for the final snapshot to be durable (inf: as long as it takes).",
        ),
    ] = 120.0,
    lease_timeout: Annotated[
        float,
        typer.Option(
            min=5,
            max=MAX_SECONDS,
            help="Seconds without heartbeat after which another writer's lease is taken over.",
        ),
    ] = 60.0,
    rank: Annotated[
        int | None,
        typer.Option(
            min=0,
            show_default=False,
            help="This node's rank in a multi-node job (default: from torchrun, SLURM, "
            "a Kubernetes Indexed Job or SkyPilot; else 0 of 1).",
        ),
    ] = None,
    world_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            show_default=False,
            help="How many nodes the job has, each with its own ckpt run (default: detected "
            "like --rank).",
        ),
    ] = None,
    allow_world_change: Annotated[
        bool,
        typer.Option(
            "--allow-world-change",
            help="Restore what a job with another --world-size wrote: rank r gets old rank "
            "r's files; ranks beyond the old world start empty.",
        ),
    ] = False,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            metavar="GLOB",
            help="File or directory names never snapshotted (repeatable), on top of temp names.",
        ),
    ] = None,
    snapshots: Annotated[
        str,
        typer.Option(
            help="auto: snapshot on quiet periods until the child's first commit, then "
            "only on commits; commit: only on commits (ckpt commit, ckpt.commit()).",
        ),
    ] = "auto",
    checkpoint_signal: Annotated[
        str,
        typer.Option(
            help="Signal that tells the child to checkpoint soon (`ckpt signal`, "
            "preemption notices); sent only to a child that installed a handler.",
        ),
    ] = "SIGUSR1",
    concurrency: Annotated[
        int, typer.Option(min=1, max=64, help="Chunks read, hashed and uploaded at once.")
    ] = 4,
    io_timeout: Annotated[
        float,
        typer.Option(
            min=1,
            max=MAX_SECONDS,
            help="Seconds any one call to the remote may take before it is retried.",
        ),
    ] = 120.0,
    preemption: Annotated[
        str,
        typer.Option(
            help="Watch for the cloud's preemption notice: auto (only on a machine whose "
            "DMI data names AWS, GCP or Azure; nothing is sent elsewhere), aws, gcp, "
            "azure, off.",
        ),
    ] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug detail too (what ckpt decides, and why).")
    ] = False,
    log_json: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            show_default=False,
            help="Also write ckpt's events to FILE, one JSON object per line.",
        ),
    ] = None,
    print_config: Annotated[
        bool,
        typer.Option(
            "--print-config",
            help="Print every option's value and where it came from (as ckpt.toml lines); "
            "run nothing.",
        ),
    ] = False,
) -> None:
    """Run COMMAND under supervision: restore --dir, snapshot it as it changes,
    restart COMMAND on recoverable exits.

    Every option can also be set by an env var CKPT_<OPTION> (CKPT_RETRIES=5,
    CKPT_IO_TIMEOUT=60) or in ckpt.toml ([tool.ckpt] in pyproject.toml), in the
    working directory; flags win over env vars, env vars over the file.

    Example: ckpt run --retries 3 --dir ./checkpoints --remote s3://b/run -- python train.py
    """
    console.configure(quiet=quiet, verbose=verbose)  # until config files are read
    with error_funnel() as status:
        from ckpt_cli import config

        settings = config.load(_from_command_line(ctx))
        console.configure(quiet=settings["quiet"], verbose=settings["verbose"])
        for note in settings.notes:
            console.info(note)
        cfg = config.run_config(settings, need_command=not print_config)
        if print_config:
            typer.echo(config.describe(settings, cfg))
        else:
            from ckpt_cli.supervisor import Supervisor

            status[0] = Supervisor(cfg).run()
    raise typer.Exit(status[0])


@app.command("restore")
def restore_cmd(
    remote: RemoteArg,
    dir: Annotated[Path, typer.Argument(help="Directory to restore into.")],
    snapshot: Annotated[
        str | None, typer.Option(help="Snapshot id or generation (default: the newest usable one).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace the contents of a DIR that is not empty."),
    ] = False,
    storage_option: StorageOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
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
        int | None, typer.Option(min=1, show_default=False, help="The job's number of nodes.")
    ] = None,
    allow_world_change: Annotated[
        bool,
        typer.Option(
            "--allow-world-change", help="Restore what a job of another --world-size wrote."
        ),
    ] = False,
) -> None:
    """Restore a snapshot into DIR (verified, swapped in atomically).

    A DIR that is not empty is refused without --force; with it, DIR keeps its
    old contents until the whole snapshot is in place, then one rename swaps
    them; files in no restorable snapshot are moved aside, never deleted.

    Example: ckpt restore s3://b/run ./checkpoints --snapshot 12 --force
    """
    console.configure(quiet=quiet)
    with error_funnel() as status:
        from ckpt_cli import commands

        status[0] = commands.restore(
            remote,
            dir,
            snapshot,
            storage_option or [],
            force=force,
            rank=rank,
            world_size=world_size,
            allow_world_change=allow_world_change,
        )
    raise typer.Exit(status[0])


@app.command()
def push(
    dir: Annotated[Path, typer.Argument(help="Directory to snapshot.")],
    remote: RemoteArg,
    keep: Annotated[int, typer.Option(min=1, help="Snapshots kept in the remote.")] = 3,
    storage_option: StorageOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    allow_empty: Annotated[
        bool,
        typer.Option(
            "--allow-empty",
            help="Push an empty DIR even though the newest snapshot holds files.",
        ),
    ] = False,
) -> None:
    """Take one snapshot of DIR now (same code path as `ckpt run`).

    An empty DIR over a remote whose newest snapshot holds files is refused
    without --allow-empty.

    Example: ckpt push ./checkpoints s3://b/run
    """
    console.configure(quiet=quiet)
    with error_funnel() as status:
        from ckpt_cli import commands

        status[0] = commands.push(dir, remote, keep, storage_option or [], allow_empty=allow_empty)
    raise typer.Exit(status[0])


@app.command("ls")
def ls_cmd(
    remote: RemoteArg,
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
    storage_option: StorageOpt = None,
    rank: Annotated[
        int | None,
        typer.Option(
            min=0, show_default=False, help="List this rank's snapshots (a multi-node job's)."
        ),
    ] = None,
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
    only used when nothing else can be (`ckpt unsuspect` clears a mark);
    `ckpt verify --full` also re-hashes chunks. There is no "kept" mark:
    --keep is a flag of each writer (`ckpt run`, `push`), not stored, so every
    snapshot listed is one the last retention kept; `ckpt gc --keep N
    --dry-run` shows what N would drop. An empty location lists nothing (exit 0).

    A multi-node job's remote: the steps complete on all ranks and each
    rank's count are listed; --rank R lists rank R's snapshots.

    Example: ckpt ls s3://b/run
    """
    with error_funnel() as status:
        from ckpt_cli import commands

        status[0] = commands.ls(remote, json_out, storage_option or [], runs=runs, rank=rank)
    raise typer.Exit(status[0])


@app.command("unsuspect")
def unsuspect_cmd(
    remote: RemoteArg,
    snapshot: Annotated[str, typer.Argument(help="Snapshot id, unique id prefix or generation.")],
    storage_option: StorageOpt = None,
) -> None:
    """Clear the crash-loop guard's mark of a snapshot, so that `ckpt restore`
    and `ckpt run` may pick it again (`ckpt ls` shows the marks). A
    snapshot without a mark is left as it is.

    Example: ckpt unsuspect s3://b/run 12
    """
    with error_funnel() as status:
        from ckpt_cli import commands

        status[0] = commands.unsuspect(remote, snapshot, storage_option or [])
    raise typer.Exit(status[0])


SnapshotOpt = Annotated[
    str | None,
    typer.Option(
        "--snapshot", help="Snapshot id, unique id prefix or generation (default: every one)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]


@app.command("show")
def show_cmd(
    remote: RemoteArg,
    snapshot: Annotated[
        str | None,
        typer.Argument(help="Snapshot id, unique id prefix or generation (default: the newest)."),
    ] = None,
    json_out: JsonOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """List the files of one snapshot: path, type, mode, size, chunks, mtime.

    Example: ckpt show s3://b/run 12
    """
    with error_funnel() as status:
        from ckpt_cli import operate

        status[0] = operate.show(remote, snapshot, json_out, storage_option or [])
    raise typer.Exit(status[0])


@app.command("diff")
def diff_cmd(
    remote: RemoteArg,
    a: Annotated[str, typer.Argument(metavar="A", help="The older snapshot (id or generation).")],
    b: Annotated[str, typer.Argument(metavar="B", help="The newer snapshot (id or generation).")],
    json_out: JsonOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Show what changed from snapshot A to B: files added, removed and changed
    (content, size, mode, symlink target; not mtimes).

    Example: ckpt diff s3://b/run 11 12
    """
    with error_funnel() as status:
        from ckpt_cli import operate

        status[0] = operate.diff(remote, a, b, json_out, storage_option or [])
    raise typer.Exit(status[0])


@app.command("verify")
def verify_cmd(
    remote: RemoteArg,
    snapshot: SnapshotOpt = None,
    full: Annotated[
        bool,
        typer.Option("--full", help="Also read and re-hash every chunk (a few at a time)."),
    ] = False,
    json_out: JsonOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Check that every manifest parses and every chunk it names exists (one
    listing), and that every stored file and checkpoint directory passes its
    format check (reading only the chunks the check needs, each verified by
    its hash); --full also re-hashes every chunk. Damaged snapshots are
    listed with what is wrong, and the exit status is 65.

    Example: ckpt verify s3://b/run --full
    """
    with error_funnel() as status:
        from ckpt_cli import operate

        status[0] = operate.verify(remote, snapshot, full, json_out, storage_option or [])
    raise typer.Exit(status[0])


@app.command("gc")
def gc_cmd(
    remote: RemoteArg,
    keep: Annotated[
        int,
        typer.Option(min=1, show_default=False, help="Restorable snapshots to keep, newest first."),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be deleted; change nothing.")
    ] = False,
    json_out: JsonOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Keep the newest --keep restorable snapshots (and damaged ones newer
    than them, for inspection; a damaged one never counts), delete the
    older ones, then every chunk no kept snapshot names and the
    half-written objects of killed writers; say what was freed. Takes the
    writer lease like `ckpt push` (refused while a run holds it);
    --dry-run runs the same code without deleting and needs no lease. The
    run history (runs/) is kept.

    Example: ckpt gc s3://b/run --keep 2 --dry-run
    """
    with error_funnel() as status:
        from ckpt_cli import operate

        status[0] = operate.gc(remote, keep, dry_run, json_out, storage_option or [])
    raise typer.Exit(status[0])


@app.command()
def commit(
    socket: Annotated[
        str | None,
        typer.Option(envvar="CKPT_SOCKET", help="Control socket of the running supervisor."),
    ] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once queued.")] = False,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait for durability.")] = None,
    step: Annotated[
        int | None,
        typer.Option(
            min=0,
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
        from ckpt_cli import commands

        status[0] = commands.commit(socket, not no_wait, timeout, step)
    raise typer.Exit(status[0])


@app.command("signal")
def signal_cmd(
    socket: Annotated[
        str | None,
        typer.Option(envvar="CKPT_SOCKET", help="Control socket of the running supervisor."),
    ] = None,
) -> None:
    """Tell the supervised script to checkpoint soon (sends --checkpoint-signal).

    Example: ckpt signal --socket /tmp/ckpt-abc123/control.sock
    """
    with error_funnel() as status:
        from ckpt_cli import commands

        status[0] = commands.send_signal(socket)
    raise typer.Exit(status[0])


@app.command("shell-shim")
def shell_shim(
    path: Annotated[bool, typer.Option("--path", help="Print the file's path instead.")] = False,
) -> None:
    """Print the bash shim (ckpt_commit, ckpt_write, ckpt_preemption_requested, ...).

    Example (in a bash training script): source "$(ckpt shell-shim --path)"
    """
    with error_funnel() as status:
        from ckpt import SHELL_SHIM

        if path:
            typer.echo(str(SHELL_SHIM))
        else:
            typer.echo(SHELL_SHIM.read_text(), nl=False)
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
        from ckpt_cli import status_cmd as impl

        status[0] = impl.status(socket, json_out)
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
    return status if isinstance(status, int) else 0
