"""Clock skew between machines does not reorder snapshots: the order is the
generation number (from listing the remote), never a machine's wall clock.

Injected two ways:
- real skewed clocks, with libfaketime (Debian package `faketime`, installed by
  tests/install.sh as root): a run whose clock is a day ahead commits, then a
  run whose clock is a day behind commits a newer state (skipped, naming the
  package, where `faketime` is missing);
- always: the `created` times of manifests in a path remote rewritten to
  skewed values, as machines with wrong clocks would have written them.

Asserted: `ckpt ls --json` lists the newer generation first, `ckpt restore` and
a new `ckpt run` restore it; and a directory left by an earlier run (it holds
exactly the older snapshot) is not mistaken for newer work and kept over the
newer snapshot just because the newer snapshot's machine had a slow clock (the
README: "--dir is older than the remote and is replaced by the newest snapshot").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from faults._tally import record
from integration._util import (
    CKPT,
    PY,
    ls_json,
    manifest_paths,
    manifests,
    read_tree,
    restore_into,
    run_ckpt,
)

pytestmark = pytest.mark.timeout(120)

DAY = 86400.0

#: argv: report file, text. Reports what it was restored from, then writes
#: state.txt = text and commits it.
WRITER = """
import json, os, sys
from pathlib import Path
import ckpt
d = Path(os.environ["CKPT_DIR"])
report, text = Path(sys.argv[1]), sys.argv[2]
files = {p.name: p.read_text() for p in sorted(d.iterdir()) if p.is_file()}
report.write_text(json.dumps({"restored": os.environ["CKPT_RESTORED"], "files": files}))
tmp = d / "state.txt.tmp"
tmp.write_text(text)
os.replace(tmp, d / "state.txt")
ckpt.commit()
"""


def _faketime() -> str:
    path = shutil.which("faketime")
    if path is None:
        pytest.skip("faketime is not installed (Debian package `faketime`; tests/install.sh)")
    return path


def _run(
    tmp_path: Path,
    ckpt_dir: Path,
    remote: Path,
    text: str,
    *,
    clock: str | None = None,
) -> dict[str, Any]:
    """One `ckpt run` of the writer to completion, its clock shifted by `clock`
    (a faketime offset like "+1d"); returns the child's report."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    report = tmp_path / f"report-{text}.json"
    args = ["run", "--dir", str(ckpt_dir), "--remote", str(remote), "--backoff", "0", "--"]
    args += [PY, str(script), str(report), text]
    prefix = [_faketime(), "-f", clock] if clock else []
    res = subprocess.run(
        [*prefix, str(CKPT), *args],
        cwd=tmp_path,
        env=dict(os.environ),
        text=True,
        capture_output=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert res.returncode == 0, f"ckpt run (clock {clock or 'true'}): {res.stderr}"
    doc: dict[str, Any] = json.loads(report.read_text())
    doc["stderr"] = res.stderr
    return doc


def _push(tmp_path: Path, remote: Path, src: Path, text: str) -> dict[str, Any]:
    src.mkdir(exist_ok=True)
    (src / "state.txt").write_text(text)
    res = run_ckpt(["push", str(src), str(remote)], cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    return manifests(remote)[-1]


def _skew(remote: Path, generation: int, by: float) -> None:
    """Rewrite one manifest's `created` as a machine whose clock is off by `by`
    seconds would have written it (its name and generation stay)."""
    (path,) = [p for p in manifest_paths(remote) if int(p.name.split("-")[0]) == generation]
    doc = json.loads(path.read_bytes())
    doc["created"] = float(doc["created"]) + by
    path.write_text(json.dumps(doc, separators=(",", ":")))


def _assert_newest_is(tmp_path: Path, remote: Path, gen: int, text: str) -> None:
    rows = ls_json(remote, cwd=tmp_path)["snapshots"]
    assert [r["generation"] for r in rows] == sorted((r["generation"] for r in rows), reverse=True)
    assert rows[0]["generation"] == gen, f"ls lists {rows[0]} first, not generation {gen}"
    out = tmp_path / f"restored-{gen}-{text}"
    restore_into(remote, out, cwd=tmp_path)
    assert read_tree(out) == {"state.txt": text.encode()}


def test_real_skewed_clocks_do_not_reorder_snapshots(tmp_path: Path, remote: Path) -> None:
    """Injected: run 1 with its clock a day ahead commits "v1"; run 2 with its
    clock a day behind (fresh dir: another machine) commits "v2". Asserted: the
    skew is in the manifests (v2's created is earlier), yet ls lists v2's
    generation first, restore gives v2, and a new run restores v2."""
    first = _run(tmp_path, tmp_path / "ck1", remote, "v1", clock="+1d")
    assert first["restored"] == ""
    second = _run(tmp_path, tmp_path / "ck2", remote, "v2", clock="-1d")
    assert second["files"] == {"state.txt": "v1"}
    gen1, gen2 = manifests(remote)[-2:]
    assert gen1["created"] - gen2["created"] > 1.5 * DAY, "the clocks were not skewed"

    _assert_newest_is(tmp_path, remote, gen2["generation"], "v2")
    third = _run(tmp_path, tmp_path / "ck3", remote, "v3")
    assert third["restored"] == gen2["id"] and third["files"] == {"state.txt": "v2"}
    assert manifests(remote)[-1]["generation"] == gen2["generation"] + 1
    record("clock skew", 2)


def test_real_skew_a_stale_dir_is_not_kept_over_a_newer_snapshot_from_a_slow_clock(
    tmp_path: Path, remote: Path
) -> None:
    """Injected: machine A (true clock) commits "v1" in dir ck-A; machine B,
    whose clock is a day behind, restores it and commits "v2"; then A runs
    again on its old ck-A, which holds exactly snapshot v1. Asserted: A's run
    starts from v2 (its dir is older than the remote) and v2 stays restorable
    as the newest state; the stale v1 must not become the newest snapshot."""
    _faketime()
    a_dir = tmp_path / "ck-A"
    _run(tmp_path, a_dir, remote, "v1")
    v1 = manifests(remote)[-1]
    b = _run(tmp_path, tmp_path / "ck-B", remote, "v2", clock="-1d")
    assert b["files"] == {"state.txt": "v1"}
    v2 = manifests(remote)[-1]
    assert v1["created"] - v2["created"] > 0.5 * DAY, "B's clock was not behind"

    again = _run(tmp_path, a_dir, remote, "v3")

    assert again["files"] == {"state.txt": "v2"} and again["restored"] == v2["id"], (
        f"the run on A's old dir (it holds snapshot {v1['id']}, generation 1) started from "
        f"{again['files']} (restored {again['restored']!r}) instead of the newer snapshot "
        f"{v2['id']} (generation 2) written by a machine whose clock is behind; "
        f"ckpt said:\n{again['stderr']}"
    )
    record("clock skew", 1)


def test_skewed_manifest_times_do_not_reorder_snapshots(tmp_path: Path, remote: Path) -> None:
    """Injected: of two snapshots, the older one's `created` moved a day into
    the future and the newer one's two days into the past. Asserted: ls lists
    the newer generation first, restore gives it, a new run restores it and
    writes the next generation; --snapshot 1 still gives the older one."""
    old = _push(tmp_path, remote, tmp_path / "src1", "old")
    new = _push(tmp_path, remote, tmp_path / "src2", "new")
    _skew(remote, old["generation"], +DAY)
    _skew(remote, new["generation"], -2 * DAY)
    rows = ls_json(remote, cwd=tmp_path)["snapshots"]
    assert rows[0]["created"] < rows[1]["created"], "the skew was not written"

    _assert_newest_is(tmp_path, remote, new["generation"], "new")
    out = tmp_path / "restored-old"
    restore_into(remote, out, cwd=tmp_path, snapshot=str(old["generation"]))
    assert read_tree(out) == {"state.txt": b"old"}
    run = _run(tmp_path, tmp_path / "ck", remote, "newer")
    assert run["restored"] == new["id"] and run["files"] == {"state.txt": "new"}
    assert manifests(remote)[-1]["generation"] == new["generation"] + 1
    _assert_newest_is(tmp_path, remote, new["generation"] + 1, "newer")
    record("clock skew", 1)


def test_skewed_manifest_time_does_not_keep_a_stale_dir_over_a_newer_snapshot(
    tmp_path: Path, remote: Path
) -> None:
    """Injected: dir ck holds exactly snapshot 1 (it was pushed from it); a
    newer snapshot 2 is written by a machine whose clock is a day behind (its
    `created` rewritten). Asserted: `ckpt run --dir ck` starts from snapshot 2,
    not from the stale dir, and snapshot 2's state stays the newest."""
    ck = tmp_path / "ck"
    _push(tmp_path, remote, ck, "v1")
    v2 = _push(tmp_path, remote, tmp_path / "elsewhere", "v2")
    _skew(remote, v2["generation"], -DAY)

    run = _run(tmp_path, ck, remote, "v3")

    assert run["files"] == {"state.txt": "v2"} and run["restored"] == v2["id"], (
        f"the run on a dir holding snapshot 1 started from {run['files']} "
        f"(restored {run['restored']!r}) instead of snapshot {v2['id']} (generation 2) "
        f"whose machine's clock is a day behind; ckpt said:\n{run['stderr']}"
    )
    _assert_newest_is(tmp_path, remote, v2["generation"] + 1, "v3")
    record("clock skew", 1)
