"""Fixtures for the unit tests: repositories on a local path and on memory://."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from ckpt_cli.backends import Backend, open_backend
from ckpt_cli.repository import Repository
from ckpt_cli.snapshotter import Snapshotter

from .helpers import CHUNK


def _memory_url() -> str:
    return f"memory://t-{uuid4().hex}"


def _cleanup_memory(url: str) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    with contextlib.suppress(FileNotFoundError):
        fs.rm(url.split("://", 1)[1], recursive=True)


@pytest.fixture(params=["local", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A fresh, empty backend: LocalBackend on tmp_path/r or FsspecBackend on memory://."""
    if request.param == "local":
        yield open_backend(str(tmp_path / "r"))
    else:
        url = _memory_url()
        yield open_backend(url)
        _cleanup_memory(url)


@pytest.fixture
def repo(backend: Backend) -> Repository:
    return Repository(backend, chunk_size=CHUNK)


@pytest.fixture
def local_repo(tmp_path: Path) -> Repository:
    return Repository(open_backend(str(tmp_path / "remote")), chunk_size=CHUNK)


@pytest.fixture
def make_snapshotter() -> Iterator[object]:
    made: list[Snapshotter] = []

    def make(repo: Repository, root: Path, **kwargs: object) -> Snapshotter:
        s = Snapshotter(repo, root, **kwargs)  # type: ignore[arg-type]
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
