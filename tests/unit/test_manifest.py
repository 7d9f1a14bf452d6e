"""Manifest parsing: everything unsafe or inconsistent is a ManifestError."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from ckpt_cli.manifest import (
    MAX_FILE_SIZE,
    Entry,
    Manifest,
    ManifestError,
    hash_bytes,
    safe_relpath,
)

KEY = "snapshots/0000000003-0123abcd.json"
H1 = hash_bytes(b"one")
H2 = hash_bytes(b"two")


def valid_doc() -> dict[str, Any]:
    return {
        "format": "ckpt",
        "version": 1,
        "id": "0123abcd",
        "generation": 3,
        "parent": "89abcdef",
        "created": 1700000000.5,
        "host": "node-1",
        "source": "/data/ckpt",
        "run": "r1",
        "attempt": 2,
        "reason": "change",
        "chunk_size": 10,
        "hash": "sha256",
        "new_bytes": 13,
        "new_chunks": 2,
        "files": 2,
        "size": 13,
        "entries": [
            {"path": "d", "type": "dir", "mode": 0o755, "mtime_ns": 5},
            {
                "path": "d/a.bin",
                "type": "file",
                "mode": 0o644,
                "size": 13,
                "mtime_ns": 7,
                "ino": 99,
                "chunks": [H1, H2],
            },
            {
                "path": "d/empty",
                "type": "file",
                "mode": 0o600,
                "size": 0,
                "mtime_ns": 1,
                "chunks": [],
            },
            {"path": "latest", "type": "symlink", "mode": 0o777, "target": "d/a.bin"},
        ],
    }


def encode(doc: object) -> bytes:
    return json.dumps(doc).encode()


def with_entries(*entries: dict[str, Any]) -> bytes:
    doc = valid_doc()
    doc["entries"] = list(entries)
    return encode(doc)


def file_entry(path: str, **over: Any) -> dict[str, Any]:
    e: dict[str, Any] = {
        "path": path,
        "type": "file",
        "mode": 0o644,
        "size": 3,
        "mtime_ns": 1,
        "chunks": [H1],
    }
    e.update(over)
    return e


def test_accepts_valid() -> None:
    m = Manifest.from_bytes(encode(valid_doc()), KEY)
    assert m.id == "0123abcd"
    assert m.generation == 3
    assert m.parent == "89abcdef"
    assert m.chunk_size == 10
    assert m.attempt == 2
    assert [e.path for e in m.entries] == ["d", "d/a.bin", "d/empty", "latest"]
    a = m.entries[1]
    assert a == Entry("d/a.bin", "file", 0o644, 13, 7, (H1, H2), ino=99)
    assert m.entries[3] == Entry("latest", "symlink", 0o777, target="d/a.bin")
    assert m.key == KEY
    # and it survives a round trip unchanged
    assert Manifest.from_bytes(m.to_bytes(), KEY) == m


def test_accepts_any_key_that_is_not_a_snapshot_name() -> None:
    # loaded from elsewhere (e.g. a file given on the command line): no name check
    assert Manifest.from_bytes(encode(valid_doc()), "somewhere/else.json").id == "0123abcd"


BAD_PATHS = ["../x", "/abs", "a/../b", "a//b", "./a", "", "a\0b", "a/", ".", "..", "a/.", "a/.."]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_rejects_unsafe_paths(path: str) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(with_entries(file_entry(path)), KEY)


@pytest.mark.parametrize("path", BAD_PATHS)
def test_rejects_unsafe_dir_and_symlink_paths(path: str) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(with_entries({"path": path, "type": "dir", "mode": 0o755}), KEY)
    with pytest.raises(ManifestError):
        Manifest.from_bytes(
            with_entries({"path": path, "type": "symlink", "mode": 0o777, "target": "x"}), KEY
        )


@pytest.mark.parametrize("path", [None, 3, ["a"], {"a": 1}])
def test_rejects_non_text_path(path: object) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(with_entries({**file_entry("x"), "path": path}), KEY)


@pytest.mark.parametrize("path", BAD_PATHS)
def test_safe_relpath_rejects(path: str) -> None:
    with pytest.raises(ManifestError):
        safe_relpath(path)


@pytest.mark.parametrize("path", [None, 1, b"a"])
def test_safe_relpath_rejects_non_str(path: object) -> None:
    with pytest.raises(ManifestError):
        safe_relpath(path)


@pytest.mark.parametrize(
    "path", ["a", "a/b", "a/b/c.pt", "...", "..a", "a..", ".hidden", "a b/ü.bin", "weird\\name.pt"]
)
def test_safe_relpath_accepts(path: str) -> None:
    assert safe_relpath(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "n" * 255,  # NAME_MAX bytes
        "ü" * 127,  # 254 bytes
        "/".join(["d" * 255] * 16),  # 4095 bytes in all: PATH_MAX - 1
        "a/b\udcff.pt",  # a name that is not UTF-8 on disk (surrogateescape)
    ],
)
def test_safe_relpath_accepts_up_to_the_system_limits(path: str) -> None:
    assert safe_relpath(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "n" * 256,
        "a/" + "n" * 256 + "/b",
        "ü" * 128,  # 128 characters, 256 bytes: measured in bytes
        "/".join(["d" * 240] * 17),  # 4096 bytes: PATH_MAX
        "/".join(["é" * 120] * 17),  # 2056 characters, 4096 bytes
        "a/\ud800.pt",  # a lone surrogate no file name can be
    ],
)
def test_safe_relpath_rejects_what_no_file_can_be_named(path: str) -> None:
    with pytest.raises(ManifestError):
        safe_relpath(path)


def test_rejects_duplicate_paths() -> None:
    with pytest.raises(ManifestError, match="twice"):
        Manifest.from_bytes(with_entries(file_entry("a"), file_entry("a")), KEY)
    with pytest.raises(ManifestError):
        Manifest.from_bytes(
            with_entries({"path": "a", "type": "dir", "mode": 0o755}, file_entry("a")), KEY
        )


def test_rejects_file_below_file() -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(with_entries(file_entry("a"), file_entry("a/b")), KEY)


def test_rejects_file_below_file_listed_later() -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(with_entries(file_entry("a/b/c"), file_entry("a")), KEY)


def test_rejects_file_below_symlink() -> None:
    link = {"path": "a", "type": "symlink", "mode": 0o777, "target": "/etc"}
    with pytest.raises(ManifestError):
        Manifest.from_bytes(with_entries(link, file_entry("a/passwd")), KEY)
    with pytest.raises(ManifestError):
        Manifest.from_bytes(
            with_entries(link, {"path": "a/sub", "type": "dir", "mode": 0o755}), KEY
        )


def test_accepts_file_below_implicit_dir() -> None:
    m = Manifest.from_bytes(with_entries(file_entry("x/y/z")), KEY)
    assert [e.path for e in m.entries] == ["x/y/z"]


@pytest.mark.parametrize("size", [-1, MAX_FILE_SIZE + 1, 10**30, True, "3", 3.0, None])
def test_rejects_bad_sizes(size: object) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(with_entries(file_entry("a", size=size)), KEY)


@pytest.mark.parametrize(
    ("size", "chunks"),
    [
        (3, []),
        (3, [H1, H2]),
        (0, [H1]),
        (10, [H1, H2]),  # chunk_size 10: exactly one chunk
        (11, [H1]),
        (21, [H1, H2]),
    ],
)
def test_rejects_chunk_count_not_matching_size(size: int, chunks: list[str]) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(with_entries(file_entry("a", size=size, chunks=chunks)), KEY)


@pytest.mark.parametrize(("size", "n"), [(0, 0), (1, 1), (10, 1), (11, 2), (20, 2), (21, 3)])
def test_accepts_matching_chunk_count(size: int, n: int) -> None:
    chunks = [hash_bytes(str(i).encode()) for i in range(n)]
    m = Manifest.from_bytes(with_entries(file_entry("a", size=size, chunks=chunks)), KEY)
    assert len(m.entries[0].chunks) == n


@pytest.mark.parametrize(
    "chunk",
    [
        "abc",
        H1.upper(),
        H1[:-1],
        H1 + "0",
        "../" + H1[3:],
        "g" * 64,
        H1[:63] + "\n",
        H1 + "\n",  # "$" of a regex matches before a final newline
        7,
        None,
    ],
)
def test_rejects_bad_chunk_names(chunk: object) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(with_entries(file_entry("a", chunks=[chunk])), KEY)


def test_rejects_chunks_not_a_list() -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(with_entries(file_entry("a", chunks=H1)), KEY)
    with pytest.raises(ManifestError):
        Manifest.from_bytes(
            with_entries({k: v for k, v in file_entry("a").items() if k != "chunks"}), KEY
        )


@pytest.mark.parametrize(
    ("fmt", "version"),
    [
        ("ckpt", 2),
        ("ckpt", 0),
        ("ckpt", "1"),
        ("other", 1),
        (None, 1),
        ("ckpt", None),
    ],
)
def test_rejects_unknown_format_or_version(fmt: object, version: object) -> None:
    doc = valid_doc()
    doc["format"] = fmt
    doc["version"] = version
    with pytest.raises(ManifestError):
        Manifest.from_bytes(encode(doc), KEY)


def test_rejects_unknown_hash() -> None:
    doc = valid_doc()
    doc["hash"] = "md5"
    with pytest.raises(ManifestError):
        Manifest.from_bytes(encode(doc), KEY)


def test_rejects_truncated_json() -> None:
    raw = encode(valid_doc())
    for cut in (1, len(raw) // 2, len(raw) - 1):
        with pytest.raises(ManifestError):
            Manifest.from_bytes(raw[:cut], KEY)
    with pytest.raises(ManifestError):
        Manifest.from_bytes(b"", KEY)


def test_rejects_binary_garbage() -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(b"\xff\xfe\x00garbage", KEY)


@pytest.mark.parametrize("doc", [[], [1, 2], "ckpt", 3, None, True])
def test_rejects_non_object_json(doc: object) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(encode(doc), KEY)


@pytest.mark.parametrize(
    "key",
    [
        "snapshots/0000000004-0123abcd.json",  # generation differs
        "snapshots/0000000003-0123abce.json",  # id differs
    ],
)
def test_rejects_name_mismatch(key: str) -> None:
    with pytest.raises(ManifestError, match="name"):
        Manifest.from_bytes(encode(valid_doc()), key)


@pytest.mark.parametrize("field", ["id", "generation", "chunk_size", "created", "entries"])
def test_rejects_missing_required_field(field: str) -> None:
    doc = valid_doc()
    del doc[field]
    with pytest.raises(ManifestError):
        Manifest.from_bytes(encode(doc), "x.json")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("generation", -1),
        ("generation", 10**10),
        ("generation", "3"),
        ("generation", True),
        ("chunk_size", 0),
        ("chunk_size", -10),
        ("chunk_size", (1 << 34) + 1),
        ("chunk_size", 1.5),
        ("entries", {"a": 1}),
        ("entries", "a"),
        ("created", "yesterday"),
    ],
)
def test_rejects_bad_field_values(field: str, value: object) -> None:
    doc = valid_doc()
    doc[field] = value
    with pytest.raises(ManifestError):
        Manifest.from_bytes(encode(doc), "x.json")


@pytest.mark.parametrize(
    "entry",
    [
        "a",
        ["a", "file"],
        {"path": "a", "type": "fifo", "mode": 0o644},
        {"path": "a", "type": "file", "mode": 0o644, "size": 0},  # no chunks
        {"path": "a", "type": "file", "mode": 0o10000, "size": 0, "chunks": []},
        {"path": "a", "type": "file", "mode": -1, "size": 0, "chunks": []},
        {"path": "a", "type": "file", "size": 0, "chunks": []},  # no mode
        {"path": "a", "type": "symlink", "mode": 0o777, "target": ""},
        {"path": "a", "type": "symlink", "mode": 0o777},
        {"path": "a", "type": "symlink", "mode": 0o777, "target": "x\0y"},
        {"path": "a", "type": "symlink", "mode": 0o777, "target": 5},
    ],
)
def test_rejects_bad_entries(entry: object) -> None:
    doc = valid_doc()
    doc["entries"] = [entry]
    with pytest.raises(ManifestError):
        Manifest.from_bytes(encode(doc), KEY)


def test_same_content_compares_every_field_but_the_inode() -> None:
    """same_content spells its fields out (for speed): a field added to Entry
    must be added there too, or snapshots would miss that change."""
    base = Entry("a/b", "file", 0o644, 5, 7, ("0" * 64,), "", 11)
    changed = {
        "path": "a/c",
        "type": "symlink",
        "mode": 0o600,
        "size": 6,
        "mtime_ns": 8,
        "chunks": ("1" * 64,),
        "target": "x",
    }
    names = {f.name for f in dataclasses.fields(Entry)}
    assert names == set(changed) | {"ino", "check"}, "a new Entry field: teach same_content"
    assert base.same_content(dataclasses.replace(base, ino=12))
    assert base.same_content(dataclasses.replace(base, check="zip"))
    for name, value in changed.items():
        assert not base.same_content(dataclasses.replace(base, **{name: value})), name


# ---------------------------------------------------------------- format checks


def test_a_manifest_from_before_checks_is_neither_verified_nor_not() -> None:
    m = Manifest.from_bytes(encode(valid_doc()), KEY)
    assert m.verified is None
    assert m.unverified == ()
    assert all(e.check == "" for e in m.entries)
    assert b"verified" not in m.to_bytes()
    assert b'"check"' not in m.to_bytes()


def test_check_names_and_the_verified_state_round_trip() -> None:
    doc = valid_doc()
    doc["entries"][0]["check"] = "hf-trainer"
    doc["entries"][1]["check"] = "zip"
    doc["verified"] = False
    doc["unverified"] = [{"path": "d/empty", "reason": "open for writing by pid 12"}]
    m = Manifest.from_bytes(encode(doc), KEY)
    assert [e.check for e in m.entries] == ["hf-trainer", "zip", "", ""]
    assert m.verified is False
    assert m.unverified == (("d/empty", "open for writing by pid 12"),)
    again = Manifest.from_bytes(m.to_bytes(), KEY)
    assert again == m
    whole = dataclasses.replace(m, verified=True, unverified=())
    assert Manifest.from_bytes(whole.to_bytes(), KEY).verified is True


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("verified", "yes"),
        ("verified", 1),
        ("unverified", {"path": "a"}),
        ("unverified", [{"path": "a"}]),
        ("unverified", [{"path": 1, "reason": "x"}]),
    ],
)
def test_rejects_a_bad_verified_state(field: str, value: object) -> None:
    doc = valid_doc()
    doc[field] = value
    with pytest.raises(ManifestError):
        Manifest.from_bytes(encode(doc), KEY)


@pytest.mark.parametrize("check", [3, None, ["zip"], "x" * 65])
def test_rejects_a_bad_check_name(check: object) -> None:
    doc = valid_doc()
    doc["entries"][1]["check"] = check
    with pytest.raises(ManifestError):
        Manifest.from_bytes(encode(doc), KEY)
