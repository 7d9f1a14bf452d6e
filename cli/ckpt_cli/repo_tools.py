"""Opening a repository for the operating commands (ls, show, diff, verify,
gc, restore): what a location without ckpt.json is (empty, missing, or
something that is not a repository), a snapshot by the name a user gives
it, and its manifest or one line saying it is damaged. Nothing here prints
or deletes. Checking snapshots is in `verify`, comparing two in `diff`.

"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli.backends import Backend, NotFound, open_backend
from ckpt_cli.backends.urls import parse_storage_options
from ckpt_cli.errors import CkptError, ConfigError, RemoteError
from ckpt_cli.manifest import Manifest, ManifestError
from ckpt_cli.repository import CONFIG_KEY, Repository, SnapshotRef


class DamagedError(CkptError):
    """A snapshot or repository whose data is damaged (`ckpt verify` finds them)."""

    exit_code = ExitCode.DAMAGED


# ---------------------------------------------------------------- opening


def open_existing(remote: str, options: list[str] | Mapping[str, Any]) -> Repository | None:
    """The repository at remote, or None if the location is empty (no object
    at all: no snapshot yet). RemoteError (69) if it does not exist (its bucket
    or its parent directory is missing); ConfigError (78) if it holds objects
    but no ckpt.json. options: storage options, parsed (config.locate) or as
    -o KEY=VALUE strings."""
    parsed = dict(options) if isinstance(options, Mapping) else parse_storage_options(options)
    backend = open_backend(remote, parsed)
    repo = Repository.open(backend, create=False)
    if repo is None:
        _check_empty(backend)
    return repo


def _check_empty(backend: Backend) -> None:
    """Return if the location exists (or could: its container does) and holds
    nothing; raise with one line otherwise."""
    names = backend.names()
    if not names:
        return
    hint = ""
    for name in sorted(names)[:20]:
        try:
            backend.read(f"{name}/{CONFIG_KEY}")
        except (NotFound, RemoteError):
            continue
        hint = f"; {backend.display.rstrip('/')}/{name} is one"
        break
    raise ConfigError(
        f"{backend.display} is not empty ({len(names)} entr{'y' if len(names) == 1 else 'ies'}) "
        f"but has no {CONFIG_KEY}: it is not a ckpt repository (REMOTE is the prefix that "
        f"holds {CONFIG_KEY}{hint})"
    )


def find(repo: Repository, wanted: str) -> SnapshotRef:
    """A snapshot by id, unique id prefix or generation; ConfigError naming `ckpt ls`."""
    ref = repo.find(wanted)
    if ref is None:
        raise ConfigError(
            f"no snapshot {wanted!r} in {repo.display} (an id, a unique id prefix of 4 or more "
            f"characters, or a generation number: see `ckpt ls {repo.display}`)"
        )
    return ref


def load(repo: Repository, ref: SnapshotRef) -> Manifest:
    """The manifest of ref; DamagedError (65) naming the snapshot if it is unusable."""
    try:
        return repo.load(ref)
    except ManifestError as exc:
        raise DamagedError(
            f"snapshot {ref.id} (generation {ref.generation}) in {repo.display} is damaged: "
            f"its manifest {exc} (see `ckpt verify {repo.display}`)"
        ) from None
