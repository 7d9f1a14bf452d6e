"""`import ckpt` inside the child must stay cheap: standard library only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ckpt
from ckpt import _contract

HEAVY = ("typer", "rich", "fsspec", "watchdog", "torch", "ckpt_cli", "click", "numpy")

PROBE = f"""
import json, sys
import ckpt
heavy = {set(HEAVY)!r}
print(json.dumps({{
    "heavy": sorted(m for m in sys.modules if m.split('.')[0] in heavy),
    "file": ckpt.__file__,
    "recoverable": int(ckpt.ExitCode.RECOVERABLE),
    "env": [ckpt.ENV_DIR, ckpt.ENV_ATTEMPT, ckpt.ENV_RESTORED, ckpt.ENV_SOCKET, ckpt.ENV_RUN],
}}))
"""


def _probe(tmp_path: Path, env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_import_ckpt_loads_no_heavy_module(tmp_path: Path) -> None:
    result = _probe(tmp_path, dict(os.environ))
    assert result["heavy"] == []
    assert str(result["file"]).endswith(os.path.join("ckpt", "__init__.py"))
    assert result["recoverable"] == 75


def test_shim_alone_on_pythonpath_is_importable(tmp_path: Path) -> None:
    """Only the shim directory on the path (no site-packages): still importable."""
    shims = Path(ckpt.__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(shims)
    out = subprocess.run(
        [sys.executable, "-S", "-c", PROBE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["heavy"] == []
    assert Path(result["file"]).resolve().parent.parent == shims


def test_exit_codes() -> None:
    assert int(ckpt.ExitCode.RECOVERABLE) == 75
    assert int(ckpt.ExitCode.OK) == 0
    assert int(ckpt.ExitCode.UNAVAILABLE) == 69
    assert int(ckpt.ExitCode.SOFTWARE) == 70
    assert int(ckpt.ExitCode.CONFIG) == 78
    assert int(ckpt.ExitCode.SIGINT) == 130
    assert int(ckpt.ExitCode.SIGTERM) == 143
    assert int(ckpt.ExitCode.SIGHUP) == 129


def test_env_names() -> None:
    assert ckpt.ENV_DIR == "CKPT_DIR"
    assert ckpt.ENV_ATTEMPT == "CKPT_ATTEMPT"
    assert ckpt.ENV_RESTORED == "CKPT_RESTORED"
    assert ckpt.ENV_SOCKET == "CKPT_SOCKET"
    assert ckpt.ENV_RUN == "CKPT_RUN"
    assert (ckpt.ENV_RANK, ckpt.ENV_WORLD_SIZE) == ("CKPT_RANK", "CKPT_WORLD_SIZE")
    assert ckpt.ENV_RESTORED_STEP == "CKPT_RESTORED_STEP"
    assert ckpt.CHILD_ENV == (
        "CKPT_DIR",
        "CKPT_ATTEMPT",
        "CKPT_RESTORED",
        "CKPT_SOCKET",
        "CKPT_RUN",
        "CKPT_RANK",
        "CKPT_WORLD_SIZE",
        "CKPT_RESTORED_STEP",
        "CKPT_CHECKPOINT_SIGNAL",
        "CKPT_BIN",
    )
    assert set(ckpt.__all__) >= {"ExitCode", "ENV_DIR", "CHILD_ENV"}


def test_supervisor_shares_the_contract() -> None:
    """ckpt_cli uses the very same ExitCode class as the shim (one definition)."""
    from ckpt_cli import errors

    assert errors.ExitCode is _contract.ExitCode is ckpt.ExitCode  # type: ignore[attr-defined]
