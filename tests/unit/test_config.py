"""Path and remote validation, the default remote, and --storage-option parsing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckpt_cli.config import check_remote_outside, default_remote, resolve_dir
from ckpt_cli.errors import ConfigError
from ckpt_cli.remote import parse_storage_options

# ---------------------------------------------------------------- resolve_dir


def test_resolve_dir_refuses_root() -> None:
    with pytest.raises(ConfigError, match="root"):
        resolve_dir("/")


def test_resolve_dir_refuses_root_via_dotdot(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        resolve_dir("/" + "../" * (len(tmp_path.parts) + 2))


def test_resolve_dir_refuses_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        resolve_dir(f)


def test_resolve_dir_refuses_home() -> None:
    home = Path(os.environ["HOME"])
    assert home.is_dir()
    with pytest.raises(ConfigError, match="home"):
        resolve_dir(home)
    with pytest.raises(ConfigError, match="home"):
        resolve_dir("~")
    with pytest.raises(ConfigError, match="home"):
        resolve_dir(str(home / "sub" / ".."))


def test_resolve_dir_refuses_home_via_symlink(tmp_path: Path) -> None:
    link = tmp_path / "to-home"
    link.symlink_to(os.environ["HOME"])
    with pytest.raises(ConfigError):
        resolve_dir(link)


def test_resolve_dir_refuses_home_when_home_is_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HOME itself may be a symlink (e.g. /home -> /data/home on clusters): the
    resolved --dir is compared with the resolved home, not the raw $HOME."""
    real_home = tmp_path / "real-home"
    real_home.mkdir()
    linked_home = tmp_path / "home-link"
    linked_home.symlink_to(real_home)
    monkeypatch.setenv("HOME", str(linked_home))
    with pytest.raises(ConfigError, match="home"):
        resolve_dir("~")
    with pytest.raises(ConfigError, match="home"):
        resolve_dir(real_home)


def test_resolve_dir_accepts_below_home() -> None:
    sub = Path(os.environ["HOME"]) / "ckpts"
    assert resolve_dir("~/ckpts") == Path(os.path.realpath(sub))


def test_resolve_dir_accepts_existing_and_missing(tmp_path: Path) -> None:
    existing = tmp_path / "d"
    existing.mkdir()
    assert resolve_dir(existing) == Path(os.path.realpath(existing))
    missing = tmp_path / "not" / "yet"
    assert resolve_dir(str(missing)) == Path(os.path.realpath(missing))
    assert not missing.exists()  # resolving never creates


def test_resolve_dir_relative_and_symlinked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    resolved = resolve_dir("link")
    assert resolved.is_absolute()
    assert resolved == Path(os.path.realpath(real))


# ---------------------------------------------------------------- check_remote_outside


@pytest.fixture
def ckdir(tmp_path: Path) -> Path:
    d = tmp_path / "work" / "ckpt"
    d.mkdir(parents=True)
    return Path(os.path.realpath(d))


@pytest.mark.parametrize("where", ["store", "a/b/store", ""])
def test_remote_inside_dir_refused(ckdir: Path, where: str) -> None:
    remote = str(ckdir / where) if where else str(ckdir)
    with pytest.raises(ConfigError):
        check_remote_outside(ckdir, remote)


def test_remote_inside_dir_refused_as_file_url(ckdir: Path) -> None:
    with pytest.raises(ConfigError):
        check_remote_outside(ckdir, f"file://{ckdir}/store")


def test_remote_inside_dir_via_symlink_refused(ckdir: Path, tmp_path: Path) -> None:
    link = tmp_path / "alias"
    link.symlink_to(ckdir)
    with pytest.raises(ConfigError):
        check_remote_outside(ckdir, str(link / "store"))


def test_dir_inside_remote_refused(ckdir: Path) -> None:
    with pytest.raises(ConfigError):
        check_remote_outside(ckdir, str(ckdir.parent))
    with pytest.raises(ConfigError):
        check_remote_outside(ckdir, str(ckdir.parent.parent))


@pytest.mark.parametrize("sibling", ["store", "ckpt-store", "ckpt2", "ckp"])
def test_sibling_remote_allowed(ckdir: Path, sibling: str) -> None:
    check_remote_outside(ckdir, str(ckdir.parent / sibling))


@pytest.mark.parametrize("url", ["s3://bucket/ckpt", "gs://b/x", "memory://t", "sftp://host/{dir}"])
def test_non_local_remote_allowed(ckdir: Path, url: str) -> None:
    # even when the URL's path happens to spell the local dir
    check_remote_outside(ckdir, url.format(dir=ckdir))


# ---------------------------------------------------------------- default_remote


def test_default_remote_under_xdg_data_home(tmp_path: Path) -> None:
    data_home = Path(os.environ["XDG_DATA_HOME"])
    d = tmp_path / "run" / "ckpts"
    remote = Path(default_remote(d))
    assert remote.parent == data_home / "ckpt" / "store"
    assert remote.name.startswith("ckpts-")
    assert default_remote(d) == str(remote)  # stable
    assert default_remote(tmp_path / "other" / "ckpts") != str(remote)  # distinct per dir


def test_default_remote_without_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_DATA_HOME")
    remote = Path(default_remote(tmp_path / "d"))
    assert remote.parent == Path(os.environ["HOME"]) / ".local" / "share" / "ckpt" / "store"


def test_default_remote_is_outside_dir(tmp_path: Path) -> None:
    d = tmp_path / "d"
    check_remote_outside(d, default_remote(d))


# ---------------------------------------------------------------- parse_storage_options


def test_storage_options_json_values() -> None:
    opts = parse_storage_options(
        [
            "anon=true",
            "retries=3",
            "ratio=0.5",
            "nothing=null",
            "region=us-east-1",
            'headers={"a": 1}',
            'list=[1, "x"]',
            'quoted="123"',
        ]
    )
    assert opts == {
        "anon": True,
        "retries": 3,
        "ratio": 0.5,
        "nothing": None,
        "region": "us-east-1",
        "headers": {"a": 1},
        "list": [1, "x"],
        "quoted": "123",
    }


def test_storage_options_value_may_contain_equals_and_be_empty() -> None:
    assert parse_storage_options(["token=a=b==", "empty="]) == {"token": "a=b==", "empty": ""}


def test_storage_options_dotted_keys_nest() -> None:
    opts = parse_storage_options(
        [
            "client_kwargs.endpoint_url=http://localhost:9000",
            "client_kwargs.region_name=eu",
            "a.b.c=1",
            "key=k",
        ]
    )
    assert opts == {
        "client_kwargs": {"endpoint_url": "http://localhost:9000", "region_name": "eu"},
        "a": {"b": {"c": 1}},
        "key": "k",
    }


def test_storage_options_empty() -> None:
    assert parse_storage_options([]) == {}


@pytest.mark.parametrize("item", ["novalue", "", "=value", " =x"])
def test_storage_options_not_key_value(item: str) -> None:
    with pytest.raises(ConfigError):
        parse_storage_options([item])


def test_storage_options_conflict() -> None:
    with pytest.raises(ConfigError):
        parse_storage_options(["a=1", "a.b=2"])


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("sftp://alice:hunter2@host:2222/runs/a", "sftp://host:2222/runs/a"),
        ("sftp://alice@host/runs/a", "sftp://alice@host/runs/a"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("/plain/path", "/plain/path"),
    ],
)
def test_redact_url_hides_passwords(url: str, shown: str) -> None:
    from ckpt_cli.remote import redact_url

    assert redact_url(url) == shown
    assert "hunter2" not in redact_url(url)
