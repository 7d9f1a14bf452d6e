"""dirscan.holds_a_file: what a push over a history asks before it scans."""

from __future__ import annotations

import os
from pathlib import Path

from ckpt_cli.dirscan import holds_a_file, scan


def test_a_file_anywhere_is_found(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    assert holds_a_file(tmp_path) is False
    (deep / "w.bin").write_bytes(b"x")
    assert holds_a_file(tmp_path) is True


def test_temp_names_are_not_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model.pt.tmp").write_bytes(b"half")
    (tmp_path / ".x.ckpt-restore-1").mkdir()
    (tmp_path / ".x.ckpt-restore-1" / "f").write_bytes(b"staged")
    assert holds_a_file(tmp_path) is False
    assert [e.type for e in scan(tmp_path)] == ["dir"]


def test_only_links_leave_it_to_the_scan(tmp_path: Path) -> None:
    os.symlink("/etc/hostname", tmp_path / "out")
    assert holds_a_file(tmp_path) is None
    assert scan(tmp_path) == []  # a link out of the dir is left out
    (tmp_path / "f").write_bytes(b"x")
    assert holds_a_file(tmp_path) is True
