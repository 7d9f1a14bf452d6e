"""open_backend: which backend a URL opens, and the io timeout of a caller
that names none (CKPT_IO_TIMEOUT, checked as `ckpt run` checks it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpt_cli.backends import open_backend
from ckpt_cli.backends.fsspec import FsspecBackend
from ckpt_cli.backends.local import LocalBackend
from ckpt_cli.errors import ConfigError


def test_a_local_path_opens_the_local_backend(tmp_path: Path) -> None:
    backend = open_backend(str(tmp_path / "r"))
    assert isinstance(backend, LocalBackend)
    assert backend.exclusive_create and backend.borrows_buffers and backend.reads_into
    assert backend.local_io


def test_the_io_timeout_comes_from_the_environment_checked_as_run_checks_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CKPT_IO_TIMEOUT", raising=False)
    backend = open_backend("memory://io-timeout-default")
    assert isinstance(backend, FsspecBackend) and backend.io_timeout == 120
    assert not backend.local_io  # every store behind fsspec: writes are requests
    monkeypatch.setenv("CKPT_IO_TIMEOUT", "7")
    backend = open_backend("memory://io-timeout-env")
    assert isinstance(backend, FsspecBackend) and backend.io_timeout == 7
    assert open_backend("memory://given", io_timeout=3).io_timeout == 3  # type: ignore[attr-defined]
    for raw, said in (("0.5", "is below the minimum 1"), ("soon", "is not a number")):
        monkeypatch.setenv("CKPT_IO_TIMEOUT", raw)
        with pytest.raises(ConfigError, match=rf"^CKPT_IO_TIMEOUT={raw!r} {said}$"):
            open_backend("memory://io-timeout-bad")
