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
from ckpt_cli.errors import error_funnel

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


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[
        list[str], typer.Argument(help="The command to supervise, after --.", show_default=False)
    ],
    dir: Annotated[
        Path, typer.Option("--dir", "-d", help="Checkpoint directory to protect.")
    ] = Path("checkpoints"),
    remote: Annotated[
        str | None,
        typer.Option(
            envvar="CKPT_REMOTE",
            show_default=False,
            help="Repository URL (s3://bucket/prefix, gs://, az://, sftp://, a path). "
            "Default: an embedded local store under ~/.local/share/ckpt.",
        ),
    ] = None,
    storage_option: StorageOpt = None,
    retries: Annotated[int, typer.Option(min=0, help="Relaunches after recoverable exits.")] = 3,
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
        typer.Option(min=0, help="Seconds between forwarding SIGTERM/SIGINT/SIGHUP and SIGKILL."),
    ] = 30.0,
    debounce: Annotated[
        float, typer.Option(min=0, help="Quiet seconds after the last change before a snapshot.")
    ] = 2.0,
    rescan: Annotated[
        float, typer.Option(min=1, help="Seconds between safety-net rescans when no event arrives.")
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
        float, typer.Option(min=0, help="Seconds to wait for the final snapshot to be durable.")
    ] = 120.0,
    lease_timeout: Annotated[
        float,
        typer.Option(
            min=5,
            help="Seconds without heartbeat after which another writer's lease is taken over.",
        ),
    ] = 60.0,
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
            envvar="CKPT_IO_TIMEOUT",
            help="Seconds any one call to the remote may take before it is retried.",
        ),
    ] = 120.0,
    preemption: Annotated[
        str,
        typer.Option(
            envvar="CKPT_PREEMPTION",
            help="Watch for the cloud's preemption notice: auto (only on a machine whose "
            "DMI data names AWS, GCP or Azure; nothing is sent elsewhere), aws, gcp, "
            "azure, off.",
        ),
    ] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    """Run COMMAND under supervision: restore --dir, snapshot it as it changes,
    restart COMMAND on recoverable exits.

    Example: ckpt run --retries 3 --dir ./checkpoints --remote s3://b/run -- python train.py
    """
    console.configure(quiet=quiet)
    with error_funnel() as status:
        from ckpt_cli import config, policy
        from ckpt_cli.remote import parse_storage_options
        from ckpt_cli.supervisor import Supervisor

        directory = config.resolve_dir(dir)
        url = config.default_remote(directory) if remote is None else remote
        config.check_remote_outside(directory, url)
        cfg = config.RunConfig(
            command=list(command),
            dir=directory,
            remote=url,
            storage_options=parse_storage_options(storage_option or []),
            remote_is_default=remote is None,
            retries=retries,
            retry_on=policy.parse_retry_on(retry_on),
            backoff=policy.parse_backoff(backoff),
            grace=grace,
            debounce=debounce,
            rescan=rescan,
            keep=keep,
            restore=not no_restore,
            snapshot=snapshot,
            flush_timeout=flush_timeout,
            lease_timeout=lease_timeout,
            excludes=tuple(exclude or ()),
            concurrency=concurrency,
            io_timeout=io_timeout,
            snapshots=config.parse_snapshots(snapshots),
            checkpoint_signal=policy.parse_signal(checkpoint_signal),
            preemption=config.parse_preemption(preemption),
            quiet=quiet,
        )
        status[0] = Supervisor(cfg).run()
    raise typer.Exit(status[0])


@app.command("restore")
def restore_cmd(
    remote: RemoteArg,
    dir: Annotated[Path, typer.Argument(help="Directory to restore into.")],
    snapshot: Annotated[
        str | None, typer.Option(help="Snapshot id or generation (default: the newest usable one).")
    ] = None,
    storage_option: StorageOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Restore a snapshot into DIR (verified, swapped in atomically).

    Example: ckpt restore s3://b/run ./checkpoints
    """
    console.configure(quiet=quiet)
    with error_funnel() as status:
        from ckpt_cli import commands

        status[0] = commands.restore(remote, dir, snapshot, storage_option or [])
    raise typer.Exit(status[0])


@app.command()
def push(
    dir: Annotated[Path, typer.Argument(help="Directory to snapshot.")],
    remote: RemoteArg,
    keep: Annotated[int, typer.Option(min=1, help="Snapshots kept in the remote.")] = 3,
    storage_option: StorageOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Take one snapshot of DIR now (same code path as `ckpt run`).

    Example: ckpt push ./checkpoints s3://b/run
    """
    console.configure(quiet=quiet)
    with error_funnel() as status:
        from ckpt_cli import commands

        status[0] = commands.push(dir, remote, keep, storage_option or [])
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
) -> None:
    """List snapshots, newest first (or, with --runs, the runs that wrote them).

    Example: ckpt ls s3://b/run
    """
    with error_funnel() as status:
        from ckpt_cli import commands

        status[0] = commands.ls(remote, json_out, storage_option or [], runs=runs)
    raise typer.Exit(status[0])


@app.command()
def commit(
    socket: Annotated[
        str | None,
        typer.Option(envvar="CKPT_SOCKET", help="Control socket of the running supervisor."),
    ] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once queued.")] = False,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait for durability.")] = None,
) -> None:
    """Ask the running supervisor for a snapshot now; wait until it is durable.

    Example (inside a script run by ckpt run): ckpt commit
    """
    with error_funnel() as status:
        from ckpt_cli import commands

        status[0] = commands.commit(socket, not no_wait, timeout)
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
