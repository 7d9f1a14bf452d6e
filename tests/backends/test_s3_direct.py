"""S3 reads without the SDK (`backends.s3direct`).

Through the real binary, on both test servers: `ckpt restore` and
`ckpt ls` of a repository `ckpt push` wrote through s3fs import neither
s3fs nor botocore nor aiohttp, and restore it byte for byte; a
configuration the direct path does not cover (an AWS config file that
sets S3 options) keeps the SDK for everything and restores all the same.
Neither server checks a SigV4 signature's value, only its key id:
test_sigv4.py holds the signatures to botocore's; a server that refuses
the direct path's requests is test_s3_wire.py's.

In-process: which storage options, variables and files the direct path
takes (`DirectS3.from_config`), without any network.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from ckpt_cli.backends.s3direct import DirectS3
from conftest import run_ckpt
from stores import _SAFETY_ENV as SAFETY_ENV
from stores import Store

S3_KINDS = ["s3-moto", "s3-s3rver"]
#: Modules a direct restore never imports.
SDK = ("s3fs", "botocore", "aiobotocore", "aiohttp", "fsspec")


def _imported(stderr: str) -> set[str]:
    """The top packages of every module `-X importtime` listed."""
    found = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            found.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return found


def _source(root: Path) -> dict[str, bytes]:
    made = {}
    for i, (name, size) in enumerate(
        [("weights.bin", 9 * 1024 * 1024 + 5), ("sub/opt state.bin", 4096), ("é.txt", 3)]
    ):
        data = (hashlib.sha256(str(i).encode()).digest() * (size // 32 + 1))[:size]
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        made[name] = data
    return made


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _push(store: Store, tmp_path: Path, env: dict[str, str]) -> dict[str, bytes]:
    made = _source(tmp_path / "src")
    res = run_ckpt(["push", str(tmp_path / "src"), store.url], cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    return made


@pytest.mark.slow
@pytest.mark.parametrize("kind", S3_KINDS)
def test_restore_and_ls_import_no_sdk(kind: str, store_of: Any, tmp_path: Path) -> None:
    store: Store = store_of(kind)
    env = {**SAFETY_ENV, **store.env}
    made = _push(store, tmp_path, env)
    timed = {**env, "PYTHONPROFILEIMPORTTIME": "1"}

    res = run_ckpt(["restore", store.url, str(tmp_path / "out")], cwd=tmp_path, env=timed)
    listed = run_ckpt(["ls", store.url, "--json"], cwd=tmp_path, env=timed)

    assert res.returncode == 0, res.stderr
    assert _tree(tmp_path / "out") == made
    assert listed.returncode == 0, listed.stderr
    assert '"snapshots"' in listed.stdout
    for what, stderr in (("restore", res.stderr), ("ls", listed.stderr)):
        assert not _imported(stderr) & set(SDK), (what, _imported(stderr) & set(SDK))


@pytest.mark.slow
@pytest.mark.parametrize("kind", S3_KINDS)
def test_what_the_direct_path_does_not_cover_keeps_the_sdk(
    kind: str, store_of: Any, tmp_path: Path
) -> None:
    store: Store = store_of(kind)
    config = tmp_path / "aws-config"
    config.write_text("[default]\nregion = us-east-1\ns3 =\n  addressing_style = path\n")
    env = {**SAFETY_ENV, **store.env, "AWS_CONFIG_FILE": str(config)}
    made = _push(store, tmp_path, env)

    res = run_ckpt(
        ["restore", store.url, str(tmp_path / "out")],
        cwd=tmp_path,
        env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
    )

    assert res.returncode == 0, res.stderr
    assert _tree(tmp_path / "out") == made
    assert "s3fs" in _imported(res.stderr)


# ---------------------------------------------------------------- when it applies

ENV = {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "SECRET"}
EP = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000"}


def _direct(
    tmp_path: Path, options: dict[str, Any], env: dict[str, str], url: str = "s3://bkt/repo"
) -> DirectS3 | None:
    return DirectS3.from_config(url, options, {"HOME": str(tmp_path), **env})


def test_keys_from_options_or_variables(tmp_path: Path) -> None:
    d = _direct(tmp_path, {"key": "K", "secret": "S", "endpoint_url": "http://h:1"}, {})
    assert d is not None and (d.creds.key, d.host, d.path_style) == ("K", "h:1", True)
    d = _direct(tmp_path, {}, {**ENV, **EP, "AWS_SESSION_TOKEN": "T"})
    assert d is not None and (d.creds.key, d.creds.token, d.region) == ("AKID", "T", "us-east-1")
    assert _direct(tmp_path, {"key": "K"}, EP) is None, "a key without its secret"
    assert _direct(tmp_path, {}, EP) is None, "no credentials: the SDK's chain decides"


def test_the_shared_credentials_file(tmp_path: Path) -> None:
    aws = tmp_path / ".aws"
    aws.mkdir()
    (aws / "credentials").write_text(
        "[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = FILESECRET\n"
    )
    d = _direct(tmp_path, {}, EP)
    assert d is not None and d.creds.key == "FILEKEY"
    (aws / "credentials").write_text("[default]\ncredential_process = /bin/give-keys\n")
    assert _direct(tmp_path, {}, EP) is None


def test_a_config_file_that_sets_more_than_the_region(tmp_path: Path) -> None:
    config = tmp_path / "cfg"
    config.write_text("[profile work]\nregion = eu-west-1\n")
    env = {**ENV, "AWS_CONFIG_FILE": str(config), "AWS_PROFILE": "work"}
    d = _direct(tmp_path, {}, env)
    assert d is not None and d.host == "bkt.s3.eu-west-1.amazonaws.com" and not d.path_style
    for extra in ("endpoint_url = http://x", "ca_bundle = /x.pem", "role_arn = arn:x"):
        config.write_text(f"[profile work]\nregion = eu-west-1\n{extra}\n")
        assert _direct(tmp_path, {}, env) is None, extra
    config.write_text("[profile work\nnot an ini file")
    assert _direct(tmp_path, {}, env) is None


def test_options_the_direct_path_does_not_know(tmp_path: Path) -> None:
    for options in (
        {"profile": "x"},
        {"anon": True},
        {"requester_pays": True},
        {"config_kwargs": {"s3": {"addressing_style": "virtual"}}},
        {"client_kwargs": {"proxies": {"http": "x"}}},
    ):
        assert _direct(tmp_path, options, {**ENV, **EP}) is None, options
    https = {**ENV, "AWS_ENDPOINT_URL_S3": "https://127.0.0.1:9443"}
    assert _direct(tmp_path, {"client_kwargs": {"verify": False}}, https) is None
    assert _direct(tmp_path, {"client_kwargs": {"verify": False}}, {**ENV, **EP}) is not None


def test_endpoints_regions_and_proxies(tmp_path: Path) -> None:
    assert _direct(tmp_path, {}, ENV) is None, "AWS without a region: the SDK asks the bucket's"
    d = _direct(tmp_path, {}, {**ENV, "AWS_DEFAULT_REGION": "ap-south-1"}, "s3://my.dotted.bkt/r")
    assert d is not None and (d.host, d.path_style) == ("s3.ap-south-1.amazonaws.com", True)
    ignored = {**ENV, **EP, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}
    assert _direct(tmp_path, {}, ignored) is None
    assert _direct(tmp_path, {}, {**ENV, **EP, "AWS_USE_FIPS_ENDPOINT": "true"}) is None
    for url in ("s3://K:S@bkt/r", "s3://bkt:9000/r", "s3://bkt/r?versionId=1"):
        assert _direct(tmp_path, {}, {**ENV, **EP}, url) is None, url
    with pytest.MonkeyPatch.context() as mp:  # urllib reads proxies from os.environ
        mp.setenv("http_proxy", "http://proxy.invalid:3128")
        mp.delenv("no_proxy", raising=False)
        mp.delenv("NO_PROXY", raising=False)
        assert _direct(tmp_path, {}, {**ENV, **EP}) is None
        mp.setenv("no_proxy", "127.0.0.1")
        assert _direct(tmp_path, {}, {**ENV, **EP}) is not None
    https = {**ENV, "AWS_ENDPOINT_URL_S3": "https://127.0.0.1:9443"}
    assert _direct(tmp_path, {}, {**https, "AWS_CA_BUNDLE": str(tmp_path / "missing.pem")}) is None


@pytest.mark.slow
def test_a_listing_of_many_pages(store_of: Any, tmp_path: Path) -> None:
    """Every page of a listing, keys and common prefixes, in two sizes of
    page (the server's, and 2 keys: 4 pages for 7 names)."""
    store: Store = store_of("s3-moto")
    backend = store.backend()
    for key in ("a/1", "a/2", "a/sub/3", "a/sub/4", "a/x y/é", "b/6", "top"):
        backend.write(key, key.encode())
    env = {**store.env, "HOME": str(tmp_path)}
    direct = DirectS3.from_config(store.url, {}, env)
    assert direct is not None
    bucket, _, root = store.url.split("://", 1)[1].partition("/")
    for page in (0, 2):
        listed = direct.listing(bucket, f"{root}/a/", 30.0, page=page)
        assert listed is not None
        assert sorted(k[len(root) + 1 :] for k in listed[0]) == [
            "a/1",
            "a/2",
            "a/sub/3",
            "a/sub/4",
            "a/x y/é",
        ]
        listed = direct.listing(bucket, f"{root}/", 30.0, delimiter="/", page=page)
        assert listed is not None
        assert [k[len(root) + 1 :] for k in listed[0]] == ["top"]
        assert sorted(p[len(root) + 1 :] for p in listed[1]) == ["a/", "b/"]
    assert direct.listing("no-such-bucket-here", "", 30.0) is None
    assert backend.read("a/x y/é") == "a/x y/é".encode()  # the backend reads it direct too
