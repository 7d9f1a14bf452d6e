"""Validated settings of `ckpt run`: where each one comes from, and helpers to
resolve paths and remotes; where the other commands find their remote
(`locate`: the same sources, in the same order, as `ckpt run`).

Every option of `ckpt run` is declared once in `options` (type, default,
flags, env var, key in a config file); `OPTIONS` is that declaration with
each option's parser added. `load` merges the four sources, highest first:
flag > env var (`CKPT_<NAME>`) > config file (`ckpt.toml` in the working
directory, else `[tool.ckpt]` in its `pyproject.toml`) > default, validates
every value with the same parsers whatever its source, and records the source
of each one for `ckpt run --print-config`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import signal
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli import events, options, policy, redact
from ckpt_cli.backends.urls import is_local, local_path, parse_storage_options, redact_url
from ckpt_cli.errors import ConfigError
from ckpt_cli.formats import CommandCheck
from ckpt_cli.options import DECLARED, Option
from ckpt_cli.policy import Backoff, RetryOn


def data_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "ckpt"


def default_remote(directory: Path) -> str:
    """The embedded local store for a directory: one repository per absolute
    --dir under $XDG_DATA_HOME/ckpt/store (default ~/.local/share/ckpt/store).
    A name that is not UTF-8 (b"ck\\xffpt") is hashed as its bytes; every
    other one as before, so an existing store is found again."""
    digest = hashlib.sha256(str(directory).encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return str(data_home() / "store" / f"{directory.name or 'root'}-{digest}")


def private_store_dirs(remote: str) -> None:
    """Before a writer opens the embedded store `remote` (under data_home()),
    make the directories ckpt owns there private (0700) if they are missing:
    `ckpt/` and `ckpt/store/`, whose listing names every --dir that has a
    store. The repository below them is made 0700 by its backend; a parent
    a user made already keeps its mode, and any other remote is left alone."""
    store = data_home() / "store"
    if Path(remote).parent != store:
        return
    # Best effort: a data home that cannot be made is the backend's error to
    # report (one line, 69), as when it makes the repository itself.
    with contextlib.suppress(OSError):
        data_home().parent.mkdir(parents=True, exist_ok=True)  # as mkdir -p does
        for d in (data_home(), store):
            with contextlib.suppress(FileExistsError):
                d.mkdir(mode=0o700)


def resolve_dir(raw: str | Path) -> Path:
    """Absolute, symlink-resolved checkpoint dir; refuses files and the root."""
    path = Path(os.path.realpath(Path(raw).expanduser()))
    if path == Path(path.anchor):
        raise ConfigError(f"refusing to use the filesystem root {path} as --dir")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a directory (--dir)")
    if path == Path(os.path.realpath(Path.home())):
        raise ConfigError(f"refusing to use your home directory {path} as --dir")
    return path


def check_remote_outside(directory: Path, remote: str) -> None:
    """A local remote inside --dir would snapshot itself (and vice versa)."""
    if not is_local(remote):
        return
    store = Path(os.path.realpath(local_path(remote)))
    if store == directory or directory in store.parents:
        raise ConfigError(
            f"remote {store} is inside --dir {directory}; put it elsewhere (--remote)"
        )
    if store in directory.parents:
        raise ConfigError(
            f"--dir {directory} is inside the remote {store}; put it elsewhere (--remote)"
        )


def check_lasting(remote: str, command: str) -> None:
    """A remote that keeps nothing after ckpt exits (fsspec's memory://, which
    lives inside one process) would make `durable` a lie: refused for the
    commands that write (`ckpt run`, `ckpt push`)."""
    if re.search(r"(?:^|::)memory://", remote.strip(), re.IGNORECASE):
        raise ConfigError(
            f"{command}: remote {remote} keeps nothing after ckpt exits (memory:// lives "
            "inside one process); give a path or a bucket (--remote)"
        )


def parse_preemption(value: str) -> str:
    modes = ("auto", "aws", "gcp", "azure", "off")  # preemption.MODES, without importing it
    if value not in modes:
        raise ConfigError(f"--preemption {value!r}: choose one of {', '.join(modes)}")
    return value


def parse_snapshots(value: str) -> str:
    if value not in ("auto", "commit"):
        raise ConfigError(f"--snapshots {value!r}: choose auto or commit")
    return value


#: The most seconds any duration option takes (options.MAX_SECONDS).
MAX_SECONDS = options.MAX_SECONDS


def check_number(
    value: object,
    shown: str,
    *,
    integer: bool = False,
    min: float | None = None,
    max: float | None = None,
) -> float:
    """The one check of a number, whatever its source (flag, env var, config
    file, control socket): a real number (an integer if asked; not a bool,
    not NaN) within [min, max]; +inf passes only where max is None. `shown`
    names it in the error (`--grace inf`, `CKPT_GRACE='x'`, `timeout 'x'`).
    ConfigError (one line) if not; else the value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{shown} is not {'an integer' if integer else 'a number'}")
    if integer and not isinstance(value, int):
        raise ConfigError(f"{shown} is not an integer")
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{shown} is not a number")
    if min is not None and value < min:
        raise ConfigError(f"{shown} is below the minimum {_limit(min)}")
    if max is not None and value > max:
        raise ConfigError(f"{shown} is above the maximum {_limit(max)}")
    return value


def wait_limit(seconds: float) -> float | None:
    """A duration as a timeout for a wait: None (no limit) for `inf` (or
    anything beyond what a wait accepts), else the seconds."""
    return None if seconds >= threading.TIMEOUT_MAX else seconds


def _limit(x: float) -> str:
    if isinstance(x, int):
        return str(x)
    return f"{x:.0f}" if x.is_integer() else f"{x:g}"


def parse_backoff(value: str) -> Backoff:
    """--backoff INITIAL[:MAX], its MAX at most MAX_SECONDS."""
    backoff = policy.parse_backoff(value)
    if backoff.cap > MAX_SECONDS:
        raise ConfigError(f"--backoff {value!r}: MAX is above the maximum {_limit(MAX_SECONDS)}")
    return backoff


def checks_from_flags(specs: list[str]) -> dict[str, str]:
    """--check GLOB=COMMAND, repeated -> the [checks] table (a glob given
    twice: the last one wins, as for any repeated flag)."""
    table: dict[str, str] = {}
    for spec in specs:
        check = CommandCheck.parse(spec)  # one line naming --check if malformed
        table[check.glob] = spec.partition("=")[2].strip()
    return table


def parse_checks(value: Any) -> dict[str, str | list[str]]:
    """The [checks] table: GLOB = "command line" or ["argv", "list"]; every
    program must exist now."""
    if not isinstance(value, dict):
        raise ConfigError("checks is not a table of GLOB = COMMAND")
    for glob, command in value.items():
        ok = isinstance(command, str) or (
            isinstance(command, list) and all(isinstance(a, str) for a in command)
        )
        if not ok:
            raise ConfigError(f"checks {glob!r}: the command is not a string or a list of strings")
        CommandCheck.of(glob, command, flag="checks")
    return dict(value)


#: What --checkpoint-signal may name: the two signals POSIX leaves to the
#: application. ckpt catches it (a scheduler's `--signal=B:USR1@90` reaches
#: ckpt, which passes it on) and the child installs a handler for it; every
#: other signal means something already.
CHECKPOINT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
_NOT_A_CHECKPOINT_SIGNAL: dict[int, str] = {
    signal.SIGKILL: "cannot be caught",
    signal.SIGSTOP: "cannot be caught",
    signal.SIGTERM: "already means stop to ckpt",
    signal.SIGINT: "already means stop to ckpt",
    signal.SIGHUP: "already means stop to ckpt",
    signal.SIGCHLD: "is ckpt's own",
}


def parse_checkpoint_signal(value: str) -> int:
    """--checkpoint-signal: SIGUSR1 or SIGUSR2 (SIG optional, any case);
    ConfigError (78) naming the option for any other signal, before
    anything is restored."""
    try:
        sig = policy.parse_signal(value)
    except ConfigError:
        raise ConfigError(
            f"--checkpoint-signal {value!r} is not a signal name (e.g. SIGUSR1)"
        ) from None
    if sig in _NOT_A_CHECKPOINT_SIGNAL:
        name, why = policy.signal_name(sig), _NOT_A_CHECKPOINT_SIGNAL[sig]
        raise ConfigError(f"--checkpoint-signal {value!r}: {name} {why}; choose SIGUSR1 or SIGUSR2")
    if sig not in CHECKPOINT_SIGNALS:
        raise ConfigError(
            f"--checkpoint-signal {value!r}: choose SIGUSR1 or SIGUSR2, the two signals "
            "left to the application"
        )
    return sig


# ---------------------------------------------------------------- the options of `ckpt run`

#: What a config file must hold for each kind, for error messages.
_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "list": "a list of strings",
    "table": "a table",
}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


#: What validates each value and turns it into what RunConfig holds (the
#: options without one are checked by kind and range alone).
_PARSE: dict[str, Callable[[Any], Any]] = {
    "dir": resolve_dir,
    "retry_on": policy.parse_retry_on,
    "backoff": parse_backoff,
    "snapshots": parse_snapshots,
    "checkpoint_signal": parse_checkpoint_signal,
    "preemption": parse_preemption,
    "check": parse_checks,
    "log_json": events.check_path,
}
#: The declared options (options.DECLARED) with their parsers: the one table
#: that flags, env vars and config files are read and checked by.
OPTIONS: tuple[Option, ...] = tuple(
    dataclasses.replace(
        opt,
        parse=_PARSE.get(opt.name),
        from_flags=checks_from_flags if opt.name == "check" else None,
    )
    for opt in DECLARED
)
BY_NAME = {opt.name: opt for opt in OPTIONS}
_BY_KEY = {k: opt for opt in OPTIONS for k in (opt.file_key, *opt.aliases)}


#: Every option's default as RunConfig holds it, parsed; a path's stays as
#: declared (`load` resolves it against the working directory).
DEFAULTS: dict[str, Any] = {
    opt.name: opt.parse(opt.default)
    if opt.parse and opt.default is not None and not opt.path
    else opt.default
    for opt in OPTIONS
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What `ckpt run` runs with: the settings, parsed. A field named like an
    option takes its value (run_config) and its default from the declaration."""

    command: list[str]
    dir: Path
    remote: str
    storage_options: dict[str, Any]
    remote_is_default: bool = False
    retries: int = DEFAULTS["retries"]
    retry_on: RetryOn = DEFAULTS["retry_on"]
    backoff: Backoff = DEFAULTS["backoff"]
    grace: float = DEFAULTS["grace"]
    debounce: float = DEFAULTS["debounce"]
    rescan: float = DEFAULTS["rescan"]
    keep: int = DEFAULTS["keep"]
    restore: bool = not DEFAULTS["no_restore"]
    snapshot: str | None = DEFAULTS["snapshot"]
    flush_timeout: float = DEFAULTS["flush_timeout"]
    lease_timeout: float = DEFAULTS["lease_timeout"]
    #: Which node of how many (ranks.detect): 0 of 1 is a single node.
    rank: int = 0
    world_size: int = 1
    identity_source: str = "one node"
    allow_world_change: bool = DEFAULTS["allow_world_change"]
    excludes: tuple[str, ...] = tuple(DEFAULTS["exclude"])
    concurrency: int = DEFAULTS["concurrency"]
    io_timeout: float = DEFAULTS["io_timeout"]
    snapshots: str = DEFAULTS["snapshots"]  # "auto": on quiet periods until the first commit
    checkpoint_signal: int = DEFAULTS["checkpoint_signal"]
    preemption: str = DEFAULTS["preemption"]  # auto | aws | gcp | azure | off
    #: How long an automatic snapshot waits for files in progress (seconds).
    settle_timeout: float = DEFAULTS["settle_timeout"]
    #: The built-in format checks are on (--no-format-checks turns them off).
    format_checks: bool = not DEFAULTS["no_format_checks"]
    #: The user's checks (--check GLOB=COMMAND, [checks]), first match wins.
    checks: tuple[CommandCheck, ...] = ()
    quiet: bool = DEFAULTS["quiet"]  # errors only
    verbose: bool = DEFAULTS["verbose"]  # debug detail too
    log_json: Path | None = DEFAULTS["log_json"]  # also log JSON lines to this file
    #: Failures in a row right after a restore that make it suspect (0: off).
    crash_loop: int = DEFAULTS["crash_loop"]


#: The fields of RunConfig that take the value of the option of their name;
#: run_config sets the others (the remote, the rank, the command) itself.
_AS_SET = tuple(
    f.name
    for f in dataclasses.fields(RunConfig)
    if f.name in BY_NAME and f.name not in ("remote", "rank", "world_size", "command")
)


#: Sources, highest precedence first (print-config shows these words).
FLAG, DEFAULT = "flag", "default"
CKPT_TOML, PYPROJECT = "ckpt.toml", "pyproject.toml [tool.ckpt]"


@dataclasses.dataclass(frozen=True)
class Setting:
    value: Any  # as given (what --print-config prints)
    parsed: Any  # validated, as RunConfig holds it
    source: str  # flag / env CKPT_X / ckpt.toml / pyproject.toml [tool.ckpt] / default


@dataclasses.dataclass(frozen=True)
class Settings:
    values: dict[str, Setting]
    file: Path | None = None  # the config file read, if any
    notes: tuple[str, ...] = ()  # info lines for the user

    def __getitem__(self, name: str) -> Any:
        return self.values[name].parsed


def load(
    flags: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    names: Collection[str] | None = None,
) -> Settings:
    """Merge flags > env > file > defaults; ConfigError (one line, naming the
    source) for an unknown file key or a bad value from anywhere.

    flags: the options given on the command line, by parameter name, as typer
    parsed them (--storage-option as its list of KEY=VALUE strings). names:
    only these options are settled (the other commands read a few of ckpt
    run's: `locate`); the file is still read whole, so an unknown key in it
    is an error for every command."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    redact.register_env(environ)  # before anything is printed or logged (the child's argv)
    table, label, path, notes = _read_file(cwd)
    from_file = _file_values(table, label) if label else {}
    values: dict[str, Setting] = {}
    for opt in OPTIONS:
        if names is not None and opt.name not in names:
            continue
        env = opt.env_var
        raw_env = environ.get(env, "") if env else ""
        if opt.name in flags:
            value = _from_flag(opt, flags[opt.name])
            setting = _setting(opt, value, FLAG, cwd, None, f"--{opt.file_key} {value}")
        elif raw_env.strip() and env:
            value = _from_env(opt, raw_env, env)
            setting = _setting(opt, value, f"env {env}", cwd, env, f"{env}={raw_env!r}")
        elif opt.name in from_file and label:
            key, raw = from_file[opt.name]
            value = _from_file(opt, raw, key, label)
            setting = _setting(opt, value, label, cwd, label, f"{label}: {key} = {raw!r}")
        else:
            setting = _setting(opt, copy.deepcopy(opt.default), DEFAULT, cwd, None, "")
        values[opt.name] = setting
    _settle_verbosity(values)
    return Settings(values, path, tuple(notes))


def run_config(settings: Settings, *, need_command: bool = True) -> RunConfig:
    """The RunConfig for validated settings; checks what spans options."""
    directory: Path = settings["dir"]
    remote: str | None = settings["remote"]
    url = default_remote(directory) if remote is None else remote
    check_remote_outside(directory, url)
    check_lasting(url, "ckpt run")
    command: list[str] = settings["command"]
    if need_command and not command:
        raise ConfigError(
            "no command to run: ckpt run [OPTIONS] -- COMMAND (or command = [...] in ckpt.toml)",
            exit_code=ExitCode.USAGE,
        )
    from ckpt_cli import ranks

    identity = ranks.detect(
        settings["rank"],
        settings["world_size"],
        os.environ,
        command,
        rank_source=_source_label(settings, "rank"),
        world_source=_source_label(settings, "world_size"),
    )
    return RunConfig(
        **{name: settings[name] for name in _AS_SET},
        rank=identity.rank,
        world_size=identity.world_size,
        identity_source=identity.describe(),
        command=list(command),
        remote=url,
        storage_options=settings["storage_option"],
        remote_is_default=remote is None,
        restore=not settings["no_restore"],
        excludes=tuple(settings["exclude"]),
        format_checks=not settings["no_format_checks"],
        checks=command_checks(settings),
    )


def command_checks(settings: Settings) -> tuple[CommandCheck, ...]:
    """The user's checks (--check, CKPT_CHECKS, [checks]), first match wins."""
    return tuple(
        CommandCheck.of(glob, command, timeout=settings["check_timeout"], flag="checks")
        for glob, command in settings["check"].items()
    )


# ---------------------------------------------------------------- the other commands' remote

#: The source of a remote that no flag, env var or file names: the embedded
#: store of --dir (what `ckpt run` uses when given none).
EMBEDDED = "embedded"


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a command other than `ckpt run` works: the remote, where it
    came from (a source of `Setting`, or EMBEDDED), the --dir it goes with,
    and the storage options (flag > env > file, like the remote)."""

    remote: str
    source: str
    dir: Path
    storage_options: dict[str, Any]
    settings: Settings

    @property
    def given(self) -> bool:
        """Named on the command line (as an argument or --remote)."""
        return self.source == FLAG

    def describe(self) -> str:
        """The line that says which remote a command uses."""
        shown = redact_url(self.remote)
        if self.source == EMBEDDED:
            return f"remote: {shown} (the embedded store of --dir {self.dir})"
        origin = "the command line" if self.given else self.source
        return f"remote: {shown} (from {origin})"


def locate(
    flags: Mapping[str, Any],
    *,
    writer: bool = False,
    names: Collection[str] = (),
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Location:
    """The remote of `ckpt ls`, `show`, `diff`, `verify`, `gc`, `restore` and
    `push`, found as `ckpt run` finds its own: flag (an argument counts as
    one) > CKPT_REMOTE > ckpt.toml / [tool.ckpt] > the embedded store of
    --dir (itself flag > CKPT_DIR > file > ./checkpoints). A writer (push)
    creates the embedded store as `ckpt run` does; a reader takes it only if
    it exists, so a command never reads a repository nobody named: with
    nothing to go on, ConfigError names the three ways to name one. `names`:
    other settings of `ckpt run` the command takes from the same sources."""
    settings = load(
        flags,
        environ=environ,
        cwd=cwd,
        names=("dir", "remote", "storage_option", *names),
    )
    directory: Path = settings["dir"]
    options: dict[str, Any] = settings["storage_option"]
    remote: str | None = settings["remote"]
    if remote is not None:
        return Location(remote, settings.values["remote"].source, directory, options, settings)
    store = default_remote(directory)
    if not writer and not Path(store).is_dir():
        raise ConfigError(
            f"no remote is named, and --dir {directory} has no embedded store (`ckpt run` "
            "without a remote makes one): name the remote as an argument or with --remote, "
            'in CKPT_REMOTE, or as remote = "..." in ckpt.toml ([tool.ckpt] in pyproject.toml)'
        )
    return Location(store, EMBEDDED, directory, options, settings)


#: A snapshot as a command line names it: a generation number or an id
#: prefix of 4 to 8 hex digits (ids are 8).
_SNAPSHOT_NAME = re.compile(r"^(?:[0-9]+|[0-9a-f]{4,8})$")


def names_snapshot(text: str) -> bool:
    """True if text reads as a snapshot (a generation or an id prefix)."""
    return bool(_SNAPSHOT_NAME.match(text))


def place(
    command: str,
    slots: Sequence[str],
    values: Sequence[str],
    *,
    taken: Collection[str] = (),
    required: Collection[str] = (),
) -> dict[str, str]:
    """Which positional argument is which. `slots` in their order (e.g.
    ("remote", "dir") for `ckpt restore [REMOTE] [DIR]`), less those a flag
    gave (`taken`: --remote, --dir). The required slots are filled first;
    what is left fills the optional ones from the left, so `ckpt diff A B`
    is A and B of the resolved remote, `ckpt diff REMOTE A B` names it, and
    `ckpt restore REMOTE` restores REMOTE into --dir. Too many or too few
    arguments: a usage error (2) naming the command's shape."""
    open_slots = [s for s in slots if s not in taken]
    needed = [s for s in open_slots if s in required]
    optional = [s for s in open_slots if s not in required]
    shape = " ".join(s.upper() if s in required else f"[{s.upper()}]" for s in open_slots)
    if len(values) < len(needed) or len(values) > len(open_slots):
        given = f" ({', '.join('--' + t for t in taken if t in slots)} given)" if taken else ""
        raise ConfigError(
            f"ckpt {command} takes {shape or 'no arguments'}{given}, not {len(values)} "
            f"argument{'' if len(values) == 1 else 's'} (see `ckpt {command} --help`)",
            exit_code=ExitCode.USAGE,
        )
    filled = set(needed) | set(optional[: len(values) - len(needed)])
    return dict(zip([s for s in open_slots if s in filled], values, strict=True))


def _source_label(settings: Settings, name: str) -> str:
    """How the banner names where --rank / --world-size came from."""
    source = settings.values[name].source
    flag = f"--{name.replace('_', '-')}"
    return flag if source == FLAG else f"{flag} from {source}"


def describe(settings: Settings, cfg: RunConfig) -> str:
    """`--print-config`: one `key = value  # source` line per option, valid
    TOML that can be pasted into ckpt.toml; secrets in storage options and URLs
    are masked."""
    redact.register_env()
    redact.register_options(cfg.storage_options)
    file = f"{settings.file}" if settings.file else "none"
    rows = [
        "# ckpt run: effective settings; precedence: flag > env CKPT_* > file > default",
        f"# file: {file}",
        *(f"# {note}" for note in settings.notes),
    ]
    pairs = []
    for opt in OPTIONS:
        setting = settings.values[opt.name]
        value = "" if setting.value is None else setting.value
        if isinstance(value, dict):  # a secret of any type (a number too) is masked by its key
            value = redact.masked_options(value)
        source = setting.source
        if opt.name == "remote" and cfg.remote_is_default:
            source = f"{source}: the embedded store {cfg.remote}"
        if opt.name in ("rank", "world_size") and setting.value is None:
            # Not set: detected at every start (so "" here, which loads back as
            # not set); what this environment gives is in the comment.
            source = f"not set; detected now: {cfg.identity_source}"
        pairs.append((f"{opt.file_key} = {_toml(value)}", source))
    width = min(48, max(len(left) for left, _ in pairs))
    rows += [f"{left.ljust(width)}  # {source}" for left, source in pairs]
    # Values are TOML-escaped already; this escapes what a comment may carry
    # (a path, a note) and scrubs every secret the rows name.
    return "\n".join(redact.printable(row) for row in rows)


# ---------------------------------------------------------------- sources


def _setting(
    opt: Option, value: Any, source: str, cwd: Path, where: str | None, shown: str
) -> Setting:
    """Check range and parse. Errors about a value from an env var or a file
    name it: `where` prefixes the parser's message, `shown` is `CKPT_X='v'`
    or `ckpt.toml: key = v` for range errors."""
    if value is not None and opt.kind in ("int", "float"):
        check_number(value, shown, integer=opt.kind == "int", min=opt.min, max=opt.max)
    try:
        arg = cwd / Path(value).expanduser() if opt.path and value is not None else value
        parsed = opt.parse(arg) if opt.parse and arg is not None else arg
    except ConfigError as exc:
        if where is None:
            raise
        raise ConfigError(f"{where}: {exc}") from None
    return Setting(value, parsed, source)


def _from_flag(opt: Option, value: Any) -> Any:
    if opt.kind == "table":
        if opt.from_flags is not None:
            return opt.from_flags(list(value or ()))
        options = parse_storage_options(list(value or ()))
        redact.register_options(options)  # known as secrets from now on (crash logs too)
        return options
    if opt.kind == "list":
        return list(value or ())
    return str(value) if isinstance(value, Path) else value


def _from_env(opt: Option, raw: str, env: str) -> Any:
    text = raw.strip()
    if opt.kind == "table":  # may hold secrets: never echo it
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, dict):
            example = '{"*.msgpack": "my-verify"}' if opt.from_flags else '{"anon": true}'
            raise ConfigError(f"{env} is not a JSON object (e.g. {env}='{example}')")
        redact.register_options(value)
        return value
    if opt.kind == "list":
        return [part.strip() for part in re.split(f"[,{os.pathsep}]", raw) if part.strip()]
    if opt.kind == "bool":
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"{env}={raw!r} is not a boolean (1/0, true/false, yes/no, on/off)")
    if opt.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{env}={raw!r} is not an integer") from None
    if opt.kind == "float":
        try:
            return float(text)  # nan and inf are judged with every other value
        except ValueError:
            raise ConfigError(f"{env}={raw!r} is not a number") from None
    return raw


def _from_file(opt: Option, value: Any, key: str, label: str) -> Any:
    if opt.optional and value == "":
        return None  # `rank = ""`, `remote = ""`: as --print-config prints an unset one
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "table": isinstance(value, dict),
    }[opt.kind]
    if not ok:
        shown = "" if opt.kind == "table" else f" = {value!r}"
        raise ConfigError(f"{label}: {key}{shown} is not {_EXPECTED[opt.kind]}")
    if opt.kind == "table":
        redact.register_options(value)
    return float(value) if opt.kind == "float" else value


def _read_file(cwd: Path) -> tuple[dict[str, Any], str | None, Path | None, list[str]]:
    """The settings table of ckpt.toml, else of [tool.ckpt] in pyproject.toml
    (both in cwd only); its label and path; notes for the user."""
    ckpt_toml, pyproject = cwd / "ckpt.toml", cwd / "pyproject.toml"
    if ckpt_toml.is_file():
        notes = []
        if pyproject.is_file():
            try:
                if "ckpt" in _load_toml(pyproject, "pyproject.toml").get("tool", {}):
                    notes.append("ckpt.toml is used; [tool.ckpt] in pyproject.toml is ignored")
            except ConfigError:
                pass  # not ours to judge when ckpt.toml is there
        return _load_toml(ckpt_toml, CKPT_TOML), CKPT_TOML, ckpt_toml, notes
    if pyproject.is_file():
        tool = _load_toml(pyproject, "pyproject.toml").get("tool", {})
        if isinstance(tool, dict) and "ckpt" in tool:
            if not isinstance(tool["ckpt"], dict):
                raise ConfigError(f"{PYPROJECT} is not a table")
            return tool["ckpt"], PYPROJECT, pyproject, []
    return {}, None, None, []


def _load_toml(path: Path, label: str) -> dict[str, Any]:
    import tomllib  # only `ckpt run` reads config files

    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {label}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label} is not valid TOML: {exc}") from None


def _file_values(table: Mapping[str, Any], label: str) -> dict[str, tuple[str, Any]]:
    """Option name -> (key as written, value); unknown or repeated keys are errors."""
    out: dict[str, tuple[str, Any]] = {}
    for key, value in table.items():
        opt = _BY_KEY.get(key.replace("_", "-"))
        if opt is None:
            keys = sorted({o.file_key for o in OPTIONS})
            close = difflib.get_close_matches(key.replace("_", "-"), keys, n=3)
            hint = (
                f"did you mean {' or '.join(repr(c) for c in close)}?"
                if close
                else f"known keys: {', '.join(keys)}"
            )
            raise ConfigError(f"{label}: unknown key {key!r} ({hint})")
        if opt.name in out:
            raise ConfigError(f"{label}: {out[opt.name][0]!r} and {key!r} set the same option")
        out[opt.name] = (key, value)
    return out


def _settle_verbosity(values: dict[str, Setting]) -> None:
    """--quiet and --verbose together: the one from the higher source wins;
    from the same kind of source they contradict each other."""
    quiet, verbose = values.get("quiet"), values.get("verbose")
    if quiet is None or verbose is None or not (quiet.value and verbose.value):
        return
    rank_q, rank_v = _rank(quiet.source), _rank(verbose.source)
    if rank_q == rank_v:
        raise ConfigError(f"--quiet and --verbose contradict each other ({quiet.source})")
    loser, winner = ("quiet", "verbose") if rank_v < rank_q else ("verbose", "quiet")
    lost = values[loser]
    values[loser] = Setting(False, False, f"{lost.source}, overridden by {winner}")


def _rank(source: str) -> int:
    if source == FLAG:
        return 0
    if source.startswith("env "):
        return 1
    return 3 if source == DEFAULT else 2


# ---------------------------------------------------------------- TOML output

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml(value: Any) -> str:
    """A TOML value on one line (inline tables; a None inside a table, which
    TOML cannot spell, is left out like an absent key)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if math.isfinite(value):
            return repr(value)
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        items = [f"{_toml_key(str(k))} = {_toml(v)}" for k, v in value.items() if v is not None]
        return "{" + ", ".join(items) + "}"
    text = json.dumps(str(value), ensure_ascii=False)
    if text.isprintable():
        return text
    # JSON escapes C0 controls only: DEL, C1 controls (\x9b is a CSI), bidi
    # overrides and the like are escaped too, as TOML spells it.
    return "".join(ch if ch.isprintable() else _toml_escape(ch) for ch in text)


def _toml_escape(ch: str) -> str:
    code = ord(ch)
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml(key)


def env_io_timeout(environ: Mapping[str, str] | None = None) -> float:
    """--io-timeout where no setting of `ckpt run` gives it (the operating
    commands open their remote with it): CKPT_IO_TIMEOUT, judged by the very
    check `ckpt run` applies to it, else the option's default."""
    opt = next(o for o in OPTIONS if o.name == "io_timeout")
    env = opt.env_var or ""
    raw = (os.environ if environ is None else environ).get(env, "")
    if not raw.strip():
        return float(opt.default)
    value = _from_env(opt, raw, env)
    return float(check_number(value, f"{env}={raw!r}", min=opt.min, max=opt.max))
