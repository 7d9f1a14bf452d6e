"""Every option of `ckpt run`, declared once: its type, default, flag names,
help, range, env var and key in a config file. The typer parameters of
`ckpt run` (main), the table `config` validates with (its parsers added),
the defaults of `RunConfig` and the options table of the docs (a test
compares them) all come from here.

Standard library only: `ckpt --help` imports it at start-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

Kind = Literal["int", "float", "bool", "str", "list", "table"]

#: The most seconds any duration option takes (30 days): beyond any sensible
#: value, and far within what a wait accepts (threading's waits raise
#: OverflowError past ~292 years, so `--grace 1e12` or `inf` crashed a stop).
#: --flush-timeout alone may be `inf`: wait as long as it takes.
MAX_SECONDS = 30 * 86400.0
#: The largest training step (`ckpt commit --step`, ckpt.commit(step=)): what
#: a manifest and the control socket take.
MAX_STEP = (1 << 62) - 1
#: Most ranks a world may have (--world-size; a sanity bound on what an
#: environment says too).
MAX_WORLD = 1 << 20


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting of `ckpt run`. `name` is its parameter name; the flag is
    `--name-with-dashes` unless `flags` says otherwise; the config-file key
    is the long flag without `--` (dashes or underscores)."""

    name: str
    kind: Kind
    default: Any
    #: The flag's help (`ckpt run --help`).
    help: str = ""
    #: Flag names; () -> (`--name-with-dashes`,).
    flags: tuple[str, ...] = ()
    metavar: str | None = None
    #: --help shows the default.
    show_default: bool = True
    #: A positional argument (the command after `--`), not a flag.
    argument: bool = False
    env: str | None = ""  # "" -> CKPT_<NAME>; None -> no env var
    key: str = ""  # "" -> name with dashes
    aliases: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    #: An empty string in a file means "not set" (as --print-config prints it);
    #: an empty env var is "not set" for every option.
    optional: bool = False
    #: A path: relative to the working directory (where the config file is).
    path: bool = False
    #: What an option without a default value does, in the docs' table
    #: ("detected"); "" for none.
    unset: str = ""
    #: Validates a value and turns it into what RunConfig holds (ConfigError
    #: if bad); set by `config`, which holds the parsers.
    parse: Callable[[Any], Any] | None = None
    #: A table's flag form (repeated strings) -> the table (default: KEY=VALUE
    #: storage options); set by `config`.
    from_flags: Callable[[list[str]], dict[str, Any]] | None = None

    @property
    def file_key(self) -> str:
        return self.key or self.name.replace("_", "-")

    @property
    def env_var(self) -> str | None:
        return f"CKPT_{self.name.upper()}" if self.env == "" else self.env

    @property
    def flag_names(self) -> tuple[str, ...]:
        return self.flags or (f"--{self.name.replace('_', '-')}",)


DECLARED: tuple[Option, ...] = (
    Option(
        "dir",
        "str",
        "checkpoints",
        help="Checkpoint directory to protect.",
        flags=("--dir", "-d"),
        path=True,
    ),
    Option(
        "remote",
        "str",
        None,
        help="Repository URL (s3://bucket/prefix, gs://, az://, sftp://, a path). Default: an "
        "embedded local store under ~/.local/share/ckpt.",
        show_default=False,
        optional=True,
        unset="embedded store",
    ),
    Option(
        "storage_option",
        "table",
        {},
        help="fsspec option for the remote (repeatable; VALUE may be JSON).",
        flags=("--storage-option", "-o"),
        metavar="KEY=VALUE",
        env="CKPT_STORAGE_OPTIONS",
        key="storage-options",
        aliases=("storage-option",),
    ),
    Option(
        "retries",
        "int",
        3,
        help="Relaunches after recoverable exits.",
        min=0,
    ),
    Option(
        "crash_loop",
        "int",
        2,
        help="After N failures in a row right after a restore (no newer snapshot), mark that "
        "snapshot suspect and relaunch on the one before it; 0: off.",
        metavar="N",
        min=0,
    ),
    Option(
        "retry_on",
        "str",
        "75,signals",
        help="Exit codes and signal names that are recoverable; 'signals' = death by any signal "
        "but SIGINT; 'any'; 'none'.",
    ),
    Option(
        "backoff",
        "str",
        "1:60",
        help="Seconds before a relaunch: doubles each retry, with jitter, capped.",
        metavar="INITIAL[:MAX]",
    ),
    Option(
        "grace",
        "float",
        30.0,
        help="Seconds between forwarding SIGTERM/SIGINT/SIGHUP and SIGKILL.",
        min=0,
        max=MAX_SECONDS,
    ),
    Option(
        "debounce",
        "float",
        2.0,
        help="Quiet seconds after the last change before a snapshot.",
        min=0,
        max=MAX_SECONDS,
    ),
    Option(
        "rescan",
        "float",
        30.0,
        help="Seconds between safety-net rescans when no event arrives.",
        min=1,
        max=MAX_SECONDS,
    ),
    Option(
        "keep",
        "int",
        3,
        help="Snapshots kept in the remote.",
        min=1,
    ),
    Option(
        "no_restore",
        "bool",
        False,
        help="Start from --dir as it is.",
    ),
    Option(
        "snapshot",
        "str",
        None,
        help="Restore this snapshot (id or generation) instead of the newest.",
        optional=True,
    ),
    Option(  # no maximum: inf waits as long as it takes
        "flush_timeout",
        "float",
        120.0,
        help="Seconds to wait for the final snapshot to be durable (inf: as long as it takes).",
        min=0,
    ),
    Option(
        "lease_timeout",
        "float",
        60.0,
        help=(
            "Heartbeat timeout of this run's writer lease: a contender takes over a lease "
            "only after watching it unchanged this long (at once if its holder is provably gone)."
        ),
        min=5,
        max=MAX_SECONDS,
    ),
    Option(
        "rank",
        "int",
        None,
        help="This node's rank in a multi-node job (default: from torchrun, SLURM, a Kubernetes "
        "Indexed Job or SkyPilot; else 0 of 1).",
        show_default=False,
        min=0,
        optional=True,
        unset="detected",
    ),
    Option(
        "world_size",
        "int",
        None,
        help="How many nodes the job has, each with its own ckpt run (default: detected like "
        "--rank).",
        show_default=False,
        min=1,
        max=MAX_WORLD,
        optional=True,
        unset="detected",
    ),
    Option(
        "allow_world_change",
        "bool",
        False,
        help="Restore what a job with another --world-size wrote: rank r gets old rank r's files; "
        "ranks beyond the old world start empty.",
    ),
    Option(
        "exclude",
        "list",
        [],
        help="File or directory names never snapshotted (repeatable), on top of temp names.",
        metavar="GLOB",
        aliases=("excludes",),
    ),
    Option(
        "snapshots",
        "str",
        "auto",
        help="auto: snapshot on quiet periods until the child's first commit, then only on "
        "commits; commit: only on commits (ckpt commit, ckpt.commit()).",
    ),
    Option(
        "checkpoint_signal",
        "str",
        "SIGUSR1",
        help="Signal that tells the child to checkpoint soon (`ckpt signal`, preemption notices): "
        "SIGUSR1 or SIGUSR2; sent only to a child that installed a handler.",
    ),
    Option(
        "concurrency",
        "int",
        4,
        help="Chunks read, hashed and uploaded at once.",
        min=1,
        max=64,
    ),
    Option(
        "io_timeout",
        "float",
        120.0,
        help="Seconds any one call to the remote may take before it is retried.",
        min=1,
        max=MAX_SECONDS,
    ),
    Option(
        "preemption",
        "str",
        "auto",
        help="Watch for the cloud's preemption notice: auto (only on a machine whose DMI data "
        "names AWS, GCP or Azure; nothing is sent elsewhere), aws, gcp, azure, off.",
    ),
    Option(
        "settle_timeout",
        "float",
        120.0,
        help="Seconds an automatic snapshot waits for files in progress (open for writing by the "
        "job, or failing their format check) before it is taken anyway, marked unverified.",
        min=0,
        max=MAX_SECONDS,
    ),
    Option(
        "no_format_checks",
        "bool",
        False,
        help="Turn the built-in format checks off (zip, safetensors, HDF5, ...); --check commands "
        "still run.",
    ),
    Option(
        "check",
        "table",
        {},
        help="A check for files matching GLOB: COMMAND gets the file and exits 0 when it is whole "
        "(repeatable; before the built-in checks).",
        metavar="GLOB=COMMAND",
        env="CKPT_CHECKS",
        key="checks",
        aliases=("check",),
    ),
    Option(
        "check_timeout",
        "float",
        60.0,
        help="Seconds a --check command may take (else: not whole).",
        min=1,
        max=MAX_SECONDS,
    ),
    Option(
        "quiet",
        "bool",
        False,
        help="Only errors.",
        flags=("--quiet", "-q"),
    ),
    Option(
        "verbose",
        "bool",
        False,
        help="Debug detail too (what ckpt decides, and why).",
        flags=("--verbose", "-v"),
    ),
    Option(
        "log_json",
        "str",
        None,
        help="Also write ckpt's events to FILE, one JSON object per line.",
        metavar="FILE",
        show_default=False,
        optional=True,
        path=True,
    ),
    # The command after `--`; a file may give it as a list (no env var).
    Option(
        "command",
        "list",
        [],
        help="The command to supervise, after -- (or `command = [...]` in ckpt.toml).",
        show_default=False,
        argument=True,
        env=None,
        optional=True,
    ),
)
BY_NAME = {opt.name: opt for opt in DECLARED}
