"""Fixtures shared by every test: isolation from the real home directory, the
path of the real `ckpt` binary, and helpers to run it around child scripts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from faults._tally import TALLY_ENV, totals
from metadata import metadata  # noqa: F401
from stores import servers, store, store_of  # noqa: F401


def pytest_configure(config: pytest.Config) -> None:
    """The controller (or a run without xdist) makes the fault tally's directory;
    xdist workers inherit it through the environment."""
    if not hasattr(config, "workerinput") and TALLY_ENV not in os.environ:
        os.environ[TALLY_ENV] = tempfile.mkdtemp(prefix="ckpt-fault-tally-")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    where = os.environ.get(TALLY_ENV)
    if hasattr(config, "workerinput") or not where or not Path(where).is_dir():
        return
    counts = totals(Path(where))
    shutil.rmtree(where, ignore_errors=True)
    if not counts:
        return
    terminalreporter.section("fault injection: faults survived, by kind")
    for kind, n in sorted(counts.items()):
        terminalreporter.write_line(f"{n:6d}  {kind}")
    terminalreporter.write_line(f"{sum(counts.values()):6d}  in all")
    if report := os.environ.get("CKPT_FAULT_REPORT"):
        Path(report).write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")


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
    # `ckpt status` finds running supervisors in $XDG_RUNTIME_DIR/ckpt: per test.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(home / "runtime"))
    monkeypatch.delenv("CKPT_REMOTE", raising=False)
    for name in ("CKPT_DIR", "CKPT_ATTEMPT", "CKPT_RESTORED", "CKPT_SOCKET", "CKPT_RUN"):
        monkeypatch.delenv(name, raising=False)
    # --preemption auto reads DMI data to decide whether to poll a cloud's
    # metadata service: an empty DMI dir makes every test machine "no cloud", so
    # no test sends a packet to a metadata address even on a cloud VM.
    no_dmi = home / "no-dmi"
    no_dmi.mkdir()
    monkeypatch.setenv("CKPT_DMI_DIR", str(no_dmi))
    for name in ("CKPT_METADATA_URL", "CKPT_PREEMPTION"):
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
