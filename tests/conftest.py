"""Fixtures shared by every test: isolation from the real home directory, the
path of the real `ckpt` binary, and helpers to run it around child scripts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from stores import servers, store, store_of  # noqa: F401

BIN_DIR = Path(sys.executable).parent
CKPT = BIN_DIR / "ckpt"


@pytest.fixture(autouse=True)
def _isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """No test may touch the real home: HOME and the XDG dirs point into a
    per-test temp dir, for this process and every child it starts."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.delenv("CKPT_REMOTE", raising=False)
    for name in ("CKPT_DIR", "CKPT_ATTEMPT", "CKPT_RESTORED", "CKPT_SOCKET", "CKPT_RUN"):
        monkeypatch.delenv(name, raising=False)
    yield


@pytest.fixture
def ckpt_bin() -> Path:
    if not CKPT.exists():
        pytest.fail(f"the ckpt console script is not installed next to {sys.executable}")
    return CKPT


def write_script(path: Path, body: str) -> Path:
    """Write a Python child script (dedented) and return its path."""
    path.write_text(textwrap.dedent(body))
    return path


def run_ckpt(
    args: list[str], *, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real binary to completion; stdout and stderr captured as text."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run(
        [str(CKPT), *args],
        check=False,
        cwd=cwd,
        env=full_env,
        text=True,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
