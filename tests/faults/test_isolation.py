"""Isolation on the local side, through the real binary: no one else's entry
is adopted, followed or removed, and nothing private becomes readable.

- Planted beside a missing --dir in a shared sticky dir (1777): a
  `.NAME.ckpt-old-*` symlink to another user's dir (holding an `id_rsa`),
  another user's real dir, this user's own symlink; a `.NAME.ckpt-restore-*`
  real dir of another user beside an existing --dir. None is adopted,
  followed or removed; one warning each; nothing of theirs is uploaded.
- Modes: a 0700 --dir stays 0700 through `ckpt run` and `ckpt restore
  --force`; the embedded store and a local remote ckpt creates are 0700 with
  0600 objects; a remote root made 0750 gets 0750 dirs and 0640 objects;
  setuid, setgid, sticky and world-write are never restored.
- The shim: cp.write() over a private payload keeps it private;
  cp.save_sync(dir) keeps the mode of the checkpoint dir.

Ownership needs root (chown to another uid), or skips.
"""

from __future__ import annotations

import os
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

from integration._util import PY, manifests

from ._io import ckpt, tree, warnings
from ._tally import record

pytestmark = pytest.mark.timeout(180)

KIND = "isolation"
OTHER = 12345  # another user's uid and gid
OLD_NS = 1_704_067_200 * 10**9


def _ok(res: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stderr}"
    return res


def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("planting another user's entries needs root (chown)")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def _run(directory: Path, *extra: str, child: tuple[str, ...] = ("-c", "pass")) -> list[str]:
    return ["run", "--dir", str(directory), *extra, "--debounce", "0.2", "--", PY, *child]


def _uploaded_paths(remote: Path) -> set[str]:
    return {e["path"] for m in manifests(remote) for e in m["entries"]}


# ---------------------------------------------------------------- item 5: planted entries


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A shared sticky dir (like /tmp), and another user's private dir."""
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o1777)
    theirs = tmp_path / "theirs"
    (theirs / ".ssh").mkdir(parents=True)
    (theirs / ".ssh" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY----- theirs")
    return d


@pytest.mark.parametrize(
    "planted", ["another user's symlink", "another user's directory", "this user's symlink"]
)
def test_a_planted_moved_aside_entry_is_never_adopted(
    tmp_path: Path, shared: Path, planted: str
) -> None:
    """Injected: `.ckpts.ckpt-old-x` beside the missing --dir shared/ckpts,
    planted as named. Asserted: exit 0; --dir is a new real directory of
    this user's; the planted entry is where it was, unchanged, and what it
    leads to too; nothing of it is uploaded; one warning names it."""
    _root_only()
    theirs = tmp_path / "theirs"
    plant = shared / ".ckpts.ckpt-old-1a2b3c4d"
    if planted.endswith("symlink"):
        plant.symlink_to(theirs)
        if planted.startswith("another"):
            os.lchown(plant, OTHER, OTHER)
    else:
        (plant / ".ssh").mkdir(parents=True)
        (plant / ".ssh" / "id_rsa").write_text("planted key")
        for p in (plant, plant / ".ssh", plant / ".ssh" / "id_rsa"):
            os.lchown(p, OTHER, OTHER)
    before = tree(tmp_path / "theirs"), tree(plant) if not plant.is_symlink() else None
    remote = tmp_path / "remote"
    ck = shared / "ckpts"

    res = _ok(ckpt(_run(ck, "--remote", str(remote)), cwd=tmp_path))

    assert ck.is_dir() and not ck.is_symlink()
    assert ck.lstat().st_uid == os.geteuid()
    assert os.path.lexists(plant) and plant.is_symlink() == planted.endswith("symlink")
    assert (tree(tmp_path / "theirs"), tree(plant) if not plant.is_symlink() else None) == before
    assert not any("id_rsa" in p for p in _uploaded_paths(remote))
    said = [w for w in warnings(res.stderr) if str(plant) in w]
    assert len(said) == 1, res.stderr
    record(KIND, 1, case=f"planted {planted}")


def test_another_users_staging_dir_is_not_removed(tmp_path: Path, shared: Path) -> None:
    """Injected: another user's real dir `.ckpts.ckpt-restore-x` beside an
    existing --dir (old code: rmtree'd as root). Asserted: left whole, one
    warning names it."""
    _root_only()
    plant = shared / ".ckpts.ckpt-restore-5e6f7a8b"
    plant.mkdir()
    (plant / "their-work.bin").write_bytes(b"not ckpt's to delete")
    for p in (plant, plant / "their-work.bin"):
        os.lchown(p, OTHER, OTHER)
    ck = shared / "ckpts"
    ck.mkdir()

    res = _ok(ckpt(_run(ck, "--remote", str(tmp_path / "remote")), cwd=tmp_path))

    assert (plant / "their-work.bin").read_bytes() == b"not ckpt's to delete"
    assert len([w for w in warnings(res.stderr) if str(plant) in w]) == 1, res.stderr
    record(KIND, 1, case="another user's staging dir")


# ---------------------------------------------------------------- item 6: modes


def test_a_private_dir_stays_private_through_a_restore(tmp_path: Path) -> None:
    """Injected: --dir 0700 holding an older file; `ckpt run` restores over it,
    then `ckpt restore --force`. Asserted: --dir is 0700 after each."""
    src, remote, ck = tmp_path / "src", tmp_path / "remote", tmp_path / "ck"
    src.mkdir()
    (src / "state.txt").write_text("the remote's state")
    _ok(ckpt(["push", str(src), str(remote)], cwd=tmp_path))
    ck.mkdir(mode=0o700)
    ck.chmod(0o700)
    (ck / "old.txt").write_text("older")
    os.utime(ck / "old.txt", ns=(OLD_NS, OLD_NS))

    _ok(ckpt(_run(ck, "--remote", str(remote)), cwd=tmp_path))
    assert (ck / "state.txt").read_text() == "the remote's state"
    assert _mode(ck) == 0o700
    _ok(ckpt(["restore", str(remote), str(ck), "--force"], cwd=tmp_path))
    assert _mode(ck) == 0o700
    _ok(ckpt(["restore", str(remote), str(tmp_path / "new")], cwd=tmp_path))
    assert _mode(tmp_path / "new") == 0o700
    record(KIND, 3, case="a restored --dir keeps its mode")


WRITE_PRIVATE = """
import os, pathlib, sys
os.umask(0o022)
d = pathlib.Path(os.environ["CKPT_DIR"])
d.mkdir(mode=0o700, exist_ok=True)
os.chmod(d, 0o700)
f = d / "secret.pt"
f.write_bytes(b"private weights")
os.chmod(f, 0o600)
"""


def _all_modes(root: Path) -> tuple[set[int], set[int]]:
    dirs, files = {_mode(root)}, set()
    for p in root.rglob("*"):
        (dirs if p.is_dir() else files).add(_mode(p))
    return dirs, files


def test_the_embedded_store_and_a_new_local_remote_are_private(tmp_path: Path) -> None:
    """Injected: a 0600 file in a 0700 dir, snapshotted to the embedded store
    (no --remote) and pushed to a local remote ckpt creates. Asserted: every
    directory of either repository 0700, every object 0600."""
    script = tmp_path / "write_private.py"
    script.write_text(WRITE_PRIVATE)
    ck = tmp_path / "ck"
    res = _ok(ckpt(_run(ck, child=(str(script),)), cwd=tmp_path))
    store = Path(os.environ["XDG_DATA_HOME"]) / "ckpt" / "store"
    [repo] = list(store.iterdir())
    assert (repo / "ckpt.json").is_file(), res.stderr
    assert _all_modes(repo) == ({0o700}, {0o600})

    pushed = tmp_path / "pushed"
    _ok(ckpt(["push", str(ck), str(pushed)], cwd=tmp_path))
    assert _all_modes(pushed) == ({0o700}, {0o600})
    record(KIND, 2, case="private repositories")


def test_the_embedded_stores_own_directories_are_private(tmp_path: Path) -> None:
    """Injected: a first `ckpt run` with no --remote under umask 022, in an
    XDG_DATA_HOME that does not exist yet. Asserted: the directories ckpt
    makes for the embedded stores (ckpt/ and ckpt/store/, whose listing names
    every --dir that has a store) are 0700, not 0755; the data home itself
    is made as mkdir -p makes it."""
    data = Path(os.environ["XDG_DATA_HOME"])
    assert not (data / "ckpt").exists()
    old = os.umask(0o022)
    try:
        _ok(ckpt(_run(tmp_path / "ck"), cwd=tmp_path))
    finally:
        os.umask(old)
    assert _mode(data) == 0o755
    assert (_mode(data / "ckpt"), _mode(data / "ckpt" / "store")) == (0o700, 0o700)
    [repo] = list((data / "ckpt" / "store").iterdir())
    assert _mode(repo) == 0o700
    record(KIND, 1, case="the embedded stores' directory")


def test_a_data_home_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    """Injected: XDG_DATA_HOME below a regular file (no embedded store can be
    made there). Asserted: 69 with one line naming the store, as before the
    store's directories were made private; no crash log."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    env = {**os.environ, "XDG_DATA_HOME": str(blocker / "data")}
    res = ckpt(_run(tmp_path / "ck"), cwd=tmp_path, env=env)
    assert res.returncode == 69, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("ckpt: error:")]
    assert len(errors) == 1 and str(blocker) in errors[0], res.stderr
    assert "unexpected error" not in res.stderr
    record(KIND, 1, case="a data home that cannot be made")


def test_objects_are_no_wider_than_the_remote_root(tmp_path: Path) -> None:
    """Injected: a remote root its owner made 0750 (a group that may read).
    Asserted: dirs 0750 and objects 0640 below it, never 0755/0644."""
    src, remote = tmp_path / "src", tmp_path / "remote"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a")
    remote.mkdir()
    remote.chmod(0o750)
    _ok(ckpt(["push", str(src), str(remote)], cwd=tmp_path))
    assert _all_modes(remote) == ({0o750}, {0o640})
    record(KIND, 1, case="objects follow the root")


def test_special_and_world_write_bits_are_never_restored(tmp_path: Path) -> None:
    """Injected: a snapshot with a setuid file, a setgid file, a world-writable
    file and a sticky world-writable dir. Asserted: restored as 0755, 0755,
    0664 and 0775: the recorded bits without special and world-write."""
    src, remote, out = tmp_path / "src", tmp_path / "remote", tmp_path / "out"
    src.mkdir()
    cases = {"suid": 0o4755, "sgid": 0o2755, "open": 0o666}
    for name, mode in cases.items():
        (src / name).write_bytes(b"#!/bin/sh\n")
        (src / name).chmod(mode)
    (src / "drop").mkdir()
    (src / "drop").chmod(0o1777)
    (src / "drop" / "x").write_bytes(b"x")
    _ok(ckpt(["push", str(src), str(remote)], cwd=tmp_path))
    recorded = {e["path"]: e["mode"] for e in manifests(remote)[-1]["entries"]}
    assert recorded["suid"] == 0o4755 and recorded["drop"] == 0o1777  # the fault is real

    _ok(ckpt(["restore", str(remote), str(out)], cwd=tmp_path))

    got = {name: _mode(out / name) for name in (*cases, "drop")}
    assert got == {"suid": 0o755, "sgid": 0o755, "open": 0o664, "drop": 0o775}
    record(KIND, 4, case="special bits")


# ---------------------------------------------------------------- the shim


SHIM = """
import os, pathlib, warnings
warnings.simplefilter("ignore")
os.umask(0o022)
import ckpt
cp = ckpt.checkpoint()
cp.path.mkdir(mode=0o700, exist_ok=True)
os.chmod(cp.path, 0o700)
cp.write(b"one")
os.chmod(cp.path / "payload", 0o600)
cp.write(b"two")
src = pathlib.Path(os.environ["SRC"])
src.mkdir(mode=0o755)
(src / "model.pt").write_bytes(b"weights")
os.chmod(src / "model.pt", 0o600)
before = oct(os.stat(cp.path).st_mode & 0o7777)
payload = oct(os.stat(cp.path / "payload").st_mode & 0o7777)
cp.save_sync(src)
print(payload, before, oct(os.stat(cp.path).st_mode & 0o7777))
"""


def test_the_shims_atomic_writes_never_widen_a_mode(tmp_path: Path) -> None:
    """Injected: a payload made 0600, then written again with cp.write(); a
    0700 checkpoint dir replaced by cp.save_sync(a 0755 dir). Asserted: the
    payload stays 0600 and the checkpoint dir 0700."""
    script = tmp_path / "shim.py"
    script.write_text(textwrap.dedent(SHIM))
    ck = tmp_path / "ck"
    res = subprocess.run(
        [PY, str(script)],
        env={**os.environ, "CKPT_DIR": str(ck), "SRC": str(tmp_path / "src")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["0o600", "0o700", "0o700"]
    assert (ck / "model.pt").read_bytes() == b"weights"
    record(KIND, 2, case="shim atomic writes")
