"""ckpt._fs.write_all: every byte written, no call larger than WRITE_PIECE
(a whole 8 MiB write into new page-cache pages cost ten times more system
time on the benchmark VM: bench/ case 11), short counts continued."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import ckpt._fs as ckpt_fs


def _payload(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(n % 256)


@pytest.mark.parametrize("positioned", [False, True])
def test_every_byte_lands_in_pieces_of_at_most_write_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, positioned: bool
) -> None:
    data = _payload(3 * ckpt_fs.WRITE_PIECE + 1234)
    calls: list[int] = []
    real_write, real_pwrite = os.write, os.pwrite

    def write(fd: int, piece: memoryview) -> int:
        calls.append(len(piece))
        return real_write(fd, piece)

    def pwrite(fd: int, piece: memoryview, offset: int) -> int:
        calls.append(len(piece))
        return real_pwrite(fd, piece, offset)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "pwrite", pwrite)
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if positioned:
            os.ftruncate(fd, 100)
            ckpt_fs.write_all(fd, memoryview(data), 100)
        else:
            ckpt_fs.write_all(fd, data)
    finally:
        os.close(fd)
    expected = (bytes(100) if positioned else b"") + data
    assert path.read_bytes() == expected
    assert max(calls) <= ckpt_fs.WRITE_PIECE
    assert sum(calls) == len(data)
    assert len(calls) == 4


def test_a_short_count_is_continued_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _payload(ckpt_fs.WRITE_PIECE + 10)
    real_pwrite = os.pwrite

    def half(fd: int, piece: memoryview, offset: int) -> int:
        return real_pwrite(fd, piece[: max(1, len(piece) // 2)], offset)

    monkeypatch.setattr(os, "pwrite", half)
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        ckpt_fs.write_all(fd, data, 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_a_write_that_makes_no_progress_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "write", lambda fd, piece: 0)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as raised:
            ckpt_fs.write_all(fd, b"abc")
    finally:
        os.close(fd)
    assert raised.value.errno == errno.EIO
