"""Helpers for the integration suite: running the real `ckpt` binary in the
background, polling for conditions, and reading the on-disk repository.

Nothing here sleeps for a fixed time to let something happen: every wait is a
poll with a generous deadline, so slow machines are slower, not flakier.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ckpt_cli import processes as subtree

try:  # tests/conftest.py, imported by pytest as the top-level module `conftest`
    from conftest import CKPT, run_ckpt, write_script
except ImportError:  # pragma: no cover - pytest's importlib import mode
    _shared = importlib.import_module("tests.conftest")
    CKPT, run_ckpt, write_script = _shared.CKPT, _shared.run_ckpt, _shared.write_script

__all__ = ["CKPT", "PY", "run_ckpt", "write_script"]

PY = sys.executable
#: How long any poll waits before the test fails (seconds). Generous on purpose.
DEADLINE = 30.0
#: Upper bound for one whole `ckpt` invocation run to completion.
RUN_TIMEOUT = 90.0
MiB = 1024 * 1024

T = TypeVar("T")


# ---------------------------------------------------------------- polling


def wait_for(
    predicate: Callable[[], T],
    *,
    what: str,
    timeout: float = DEADLINE,
    interval: float = 0.05,
    proc: Running | None = None,
) -> T:
    """Poll predicate until it returns something truthy; fail after timeout.
    With proc, also fail at once (with its stderr) if that ckpt exits first."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.proc.poll() is not None:
            value = predicate()
            if value:
                return value
            raise AssertionError(
                f"ckpt exited with {proc.proc.returncode} before {what}; stderr:\n{proc.stderr()}"
            )
        if time.monotonic() >= end:
            extra = f"; ckpt stderr so far:\n{proc.stderr()}" if proc is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


def pid_gone(pid: int) -> bool:
    """True if pid no longer runs: absent, or a zombie / dead (state Z or X)."""
    proc = subtree.read_proc(pid)
    return proc is None or proc.gone


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


# ---------------------------------------------------------------- running ckpt


class Running:
    """A `ckpt` started in the background; stdout/stderr go to files (a pipe
    nobody reads could fill up and block it)."""

    def __init__(
        self,
        args: list[str],
        *,
        cwd: Path,
        logs: Path,
        name: str,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.stdout_path = logs / f"{name}.stdout"
        self.stderr_path = logs / f"{name}.stderr"
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*(prefix or []), str(CKPT), *args],
                cwd=cwd,
                env=full_env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        #: Other processes the test learnt about (the child, its children):
        #: killed at teardown if still there, so a failing test leaks nothing.
        self.extra_pids: list[int] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"ckpt did not exit within {timeout:g}s; stderr:\n{self.stderr()}"
            ) from None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        for pid in self.extra_pids:
            kill_quietly(pid)


def run_args(
    ckpt_dir: Path,
    remote: Path | str | None,
    *extra: str,
    backoff: str = "0",
    debounce: str = "0.2",
) -> list[str]:
    """`ckpt run` arguments up to and including `--`."""
    args = ["run", "--dir", str(ckpt_dir)]
    if remote is not None:
        args += ["--remote", str(remote)]
    return [*args, "--debounce", debounce, "--backoff", backoff, *extra, "--"]


def ckpt_ok(
    args: list[str], *, cwd: Path, timeout: float = RUN_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run ckpt to completion and insist on exit 0 (showing stderr if not)."""
    res = run_ckpt(args, cwd=cwd, timeout=timeout)
    assert res.returncode == 0, (
        f"ckpt {' '.join(args)} exited {res.returncode}\nstdout:\n{res.stdout}\n"
        f"stderr:\n{res.stderr}"
    )
    return res


def restore_into(
    remote: Path, dest: Path, *, cwd: Path, snapshot: str | None = None
) -> subprocess.CompletedProcess[str]:
    args = ["restore", str(remote), str(dest)]
    if snapshot is not None:
        args += ["--snapshot", snapshot]
    return ckpt_ok(args, cwd=cwd)


def ls_json(remote: Path | str, *, cwd: Path) -> dict[str, Any]:
    res = ckpt_ok(["ls", str(remote), "--json"], cwd=cwd)
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ckpt: error:")]


# ---------------------------------------------------------------- the repository on disk


def manifest_paths(remote: Path) -> list[Path]:
    """Committed manifests, oldest generation first."""
    snaps = remote / "snapshots"
    return sorted(snaps.glob("*.json")) if snaps.is_dir() else []


def load_manifest(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_bytes())
    return doc


def manifests(remote: Path) -> list[dict[str, Any]]:
    out = []
    for p in manifest_paths(remote):
        try:
            out.append(load_manifest(p))
        except (FileNotFoundError, ValueError):
            continue  # pruned between listing and reading
    return out


def newest_manifest(remote: Path) -> dict[str, Any]:
    found = manifests(remote)
    assert found, f"no snapshot in {remote}"
    return found[-1]


def entry(manifest: dict[str, Any], path: str) -> dict[str, Any] | None:
    e: dict[str, Any]
    for e in manifest["entries"]:
        if e["path"] == path:
            return e
    return None


def chunk_digests(manifest: dict[str, Any]) -> set[str]:
    return {c for e in manifest["entries"] for c in e.get("chunks", ())}


def chunk_path(remote: Path, digest: str) -> Path:
    return remote / "chunks" / digest[:2] / digest


def stored_chunks(remote: Path) -> set[str]:
    base = remote / "chunks"
    return {p.name for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")}


def has_snapshot_with(
    remote: Path, path: str, content: bytes | None = None
) -> dict[str, Any] | None:
    """The newest committed manifest listing `path` (of len(content) bytes, if given)."""
    m: dict[str, Any]
    for m in reversed(manifests(remote)):
        e = entry(m, path)
        if e is not None and (content is None or e.get("size") == len(content)):
            return m
    return None


def read_tree(root: Path) -> dict[str, bytes]:
    """Every regular file below root (relative posix path -> bytes)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def all_paths(root: Path, *, skip: Path | None = None) -> set[str]:
    """Every path below root (not following links), optionally skipping a subtree."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if skip is not None and (here == skip or skip in here.parents):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = here / name
            if skip is not None and p == skip:
                continue
            out.add(str(p))
    return out


# ---------------------------------------------------------------- child scripts

#: Writes the files given as a JSON object {relpath: text} into CKPT_DIR, each
#: atomically (tmp + os.replace), then exits with argv[2] (default 0).
WRITER = """
    import json, os, sys
    from pathlib import Path
    d = Path(os.environ["CKPT_DIR"])
    for rel, text in json.loads(sys.argv[1]).items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, p)
    sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
"""

#: Reports what the child was given: env and every file in CKPT_DIR, as JSON
#: written atomically to argv[1] (outside the checkpoint dir). Changes nothing.
REPORTER = """
    import json, os, sys
    from pathlib import Path
    d = Path(os.environ["CKPT_DIR"])
    files = {}
    if d.is_dir():
        for p in sorted(d.rglob("*")):
            if p.is_file() and not p.is_symlink():
                files[p.relative_to(d).as_posix()] = p.read_text(errors="replace")
    report = {name: os.environ.get(name) for name in
              ("CKPT_DIR", "CKPT_ATTEMPT", "CKPT_RESTORED", "CKPT_SOCKET", "CKPT_RUN")}
    report["files"] = files
    out = Path(sys.argv[1])
    tmp = out.with_name(out.name + ".part")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, out)
"""


def script(tmp_path: Path, name: str, body: str) -> list[str]:
    """Write a child script under tmp_path/scripts and return its argv prefix."""
    d = tmp_path / "scripts"
    d.mkdir(exist_ok=True)
    return [PY, str(write_script(d / name, body))]


def writer(tmp_path: Path, files: dict[str, str], exit_code: int = 0) -> list[str]:
    return [*script(tmp_path, "writer.py", WRITER), json.dumps(files), str(exit_code)]


def reporter(tmp_path: Path, report: Path) -> list[str]:
    return [*script(tmp_path, "reporter.py", REPORTER), str(report)]


def read_report(report: Path) -> dict[str, Any]:
    assert report.exists(), f"the child never wrote its report {report}"
    doc: dict[str, Any] = json.loads(report.read_text())
    return doc
