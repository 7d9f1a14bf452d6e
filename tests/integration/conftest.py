"""Fixtures of the integration suite (on top of tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ._util import Running


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    """A file-store remote private to the test."""
    return tmp_path / "remote"


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    """The checkpoint directory (not created: ckpt creates it)."""
    return tmp_path / "ck"


@pytest.fixture
def spawn(tmp_path: Path, ckpt_bin: Path) -> Iterator[Callable[..., Running]]:
    """Start `ckpt` in the background; whatever is still running at the end of
    the test (ckpt itself, and pids registered in extra_pids) is SIGKILLed."""
    started: list[Running] = []

    def start(
        args: list[str],
        *,
        name: str | None = None,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> Running:
        r = Running(
            args,
            cwd=tmp_path,
            logs=tmp_path / "logs",
            name=name or f"ckpt{len(started) + 1}",
            env=env,
            prefix=prefix,
        )
        started.append(r)
        return r

    yield start
    for r in started:
        r.cleanup()
