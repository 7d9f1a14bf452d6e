"""Validated settings of `ckpt run` and helpers to resolve paths and remotes.

Imports: standard library, `policy`, `remote` (URL helpers only), `errors`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
from pathlib import Path
from typing import Any

from ckpt_cli.errors import ConfigError
from ckpt_cli.policy import Backoff, RetryOn
from ckpt_cli.remote import is_local, local_path


@dataclasses.dataclass(frozen=True)
class RunConfig:
    command: list[str]
    dir: Path
    remote: str
    storage_options: dict[str, Any]
    remote_is_default: bool = False
    retries: int = 3
    retry_on: RetryOn = dataclasses.field(default_factory=RetryOn)
    backoff: Backoff = dataclasses.field(default_factory=Backoff)
    grace: float = 30.0
    debounce: float = 2.0
    rescan: float = 30.0
    keep: int = 3
    restore: bool = True
    snapshot: str | None = None
    flush_timeout: float = 120.0
    lease_timeout: float = 60.0
    excludes: tuple[str, ...] = ()
    concurrency: int = 4
    io_timeout: float = 120.0
    snapshots: str = "auto"  # "auto": on quiet periods until the first commit; "commit"
    checkpoint_signal: int = int(signal.SIGUSR1)
    preemption: str = "auto"  # auto | aws | gcp | azure | off (preemption.MODES)
    quiet: bool = False


def data_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "ckpt"


def default_remote(directory: Path) -> str:
    """The embedded local store for a directory: one repository per absolute
    --dir under $XDG_DATA_HOME/ckpt/store (default ~/.local/share/ckpt/store)."""
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:10]
    return str(data_home() / "store" / f"{directory.name or 'root'}-{digest}")


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


def parse_preemption(value: str) -> str:
    modes = ("auto", "aws", "gcp", "azure", "off")  # preemption.MODES, without importing it
    if value not in modes:
        raise ConfigError(
            f"--preemption {value!r} (or CKPT_PREEMPTION): choose one of {', '.join(modes)}"
        )
    return value


def parse_snapshots(value: str) -> str:
    if value not in ("auto", "commit"):
        raise ConfigError(f"--snapshots {value!r}: choose auto or commit")
    return value
