"""formats: the structural checks on files built here with the standard
library (zip, pickle, JSON, safetensors, npy and HDF5 headers written by
hand), recognition by content and by name, reading through a pinned
descriptor, user command checks (real processes) and the directory
formats. The files of the real writers (torch, numpy, h5py, Keras, HF
Trainer, Lightning) are in tests/integration/test_format_writers.py."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

import pytest

from ckpt_cli import formats
from ckpt_cli.errors import ConfigError
from ckpt_cli.formats import BytesSource, CommandCheck, Registry, Verdict
from ckpt_cli.formats import checks as format_checks
from ckpt_cli.formats import pickles as format_pickle
from ckpt_cli.formats.dirs import check_dir
from ckpt_cli.snapshotter import scan


def verdict(name: str, data: bytes) -> Verdict:
    return formats.DEFAULT.check_source(name, BytesSource(data))


def assert_truncations_fail(name: str, data: bytes, points: Iterable[int] | None = None) -> None:
    """Every prefix (or those at `points`) fails its check."""
    for n in range(len(data)) if points is None else points:
        got = verdict(name, data[:n])
        assert got.ok is False, (n, len(data), got)


# -- zip


def _zip(members: dict[str, bytes], **kw: object) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", **kw) as z:  # type: ignore[arg-type]
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_a_zip_passes_and_every_prefix_of_it_fails() -> None:
    data = _zip({"a/data.pkl": b"x" * 300, "a/data/0": bytes(range(256)) * 3})
    assert verdict("model.pt", data) == Verdict(True, "zip")
    assert_truncations_fail("model.pt", data)


def test_a_zip_with_a_comment_that_holds_an_end_signature_passes() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("w", b"1234" * 50)
        z.comment = b"PK\x05\x06 looks like an end record" + b"c" * 1000
    data = buf.getvalue()
    assert verdict("x.zip", data).ok is True
    assert_truncations_fail("x.zip", data, range(0, len(data), 7))


def test_zip64_and_deflate_pass_and_their_prefixes_fail() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for i in range(3):
            with z.open(f"m{i}", "w", force_zip64=True) as f:
                f.write(bytes(range(256)) * (i + 1))
    data = buf.getvalue()
    assert verdict("arrays.npz", data).ok is True
    assert_truncations_fail("arrays.npz", data)


def test_an_empty_zip_passes() -> None:
    assert verdict("empty.zip", _zip({})).ok is True


def test_a_zip_appended_to_in_place_fails_while_its_old_directory_is_overwritten() -> None:
    """zipfile's "a" mode writes the new member over the old central
    directory and writes the new directory at close: in between, the old end
    record still ends the file but the directory it points to is gone."""
    whole = _zip({"a": b"a" * 500, "b": b"b" * 500})
    end = whole.rfind(format_checks.ZIP_END)
    (dir_offset,) = struct.unpack_from("<L", whole, end + 16)
    torn = whole[:dir_offset] + b"PK\x03\x04" + b"n" * 40 + whole[dir_offset + 44 :]
    assert len(torn) == len(whole)
    got = verdict("m.ckpt", torn)
    assert got.ok is False and "central directory" in got.reason


def test_a_member_offset_past_the_directory_fails() -> None:
    whole = _zip({"a": b"a" * 100})
    entry = whole.find(format_checks.ZIP_DIR)
    bad = bytearray(whole)
    struct.pack_into("<L", bad, entry + 42, len(whole) - 30)
    assert verdict("m.pt", bytes(bad)).ok is False


# -- recognition


def test_content_decides_before_the_name() -> None:
    data = _zip({"x": b"1"})
    assert verdict("pytorch_model.bin", data).check == "zip"
    assert verdict("weights.safetensors", data).check == "zip"
    st = _safetensors({"w": (b"\0" * 16, "F32", [4])})
    assert verdict("model.bin", st).check == "safetensors"


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("model.pt", b""),
        ("model.pt", b"PK\x03"),
        ("model.pth", b"\x80"),
        ("w.safetensors", b"\x10\0\0"),
        ("w.safetensors", b"\x10\0\0\0\0\0\0\0{"),
        ("a.npy", b"\x93NUM"),
        ("a.keras", b""),
        ("s.json", b""),
        ("f.h5", b"\x89HD"),
        ("x.pkl", b""),
        ("f.h5", b"no superblock: h5py cannot open it" + bytes(600)),
    ],
)
def test_a_file_cut_inside_the_magic_its_name_promises_fails(name: str, data: bytes) -> None:
    got = verdict(name, data)
    assert got.ok is False, got
    assert got.reason


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("notes.txt", b"hello"),
        ("model.pt", b"this is not a checkpoint at all"),
        ("data.bin", bytes(range(256)) * 4),
        ("empty", b""),
        ("run.log", b"\x80\x02 partial"),
        ("a.ckpt", b"CKPT" + b"\0" * 100),  # some other tool's .ckpt
        ("__0_0.distcp", b"PK\x03\x04 a torch.save item, then raw tensor bytes"),
    ],
)
def test_an_unknown_format_passes_as_unrecognised(name: str, data: bytes) -> None:
    got = verdict(name, data)
    assert got.ok is None, got


# -- safetensors


def _safetensors(tensors: dict[str, tuple[bytes, str, list[int]]], pad: int = 0) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blob = b""
    for name, (data, dtype, shape) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(blob), len(blob) + len(data)],
        }
        blob += data
    text = json.dumps(header, separators=(",", ":")).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + blob


def test_safetensors_pass_and_every_prefix_fails() -> None:
    data = _safetensors({"a": (b"\1" * 64, "F32", [16]), "b": (b"\2" * 8, "I64", [1])}, pad=5)
    assert verdict("model.safetensors", data) == Verdict(True, "safetensors")
    assert_truncations_fail("model.safetensors", data)


def test_safetensors_with_bytes_past_the_last_tensor_fail() -> None:
    data = _safetensors({"a": (b"\1" * 64, "F32", [16])})
    got = verdict("m.safetensors", data + b"\0")
    assert got.ok is False and "safetensors" in got.reason


# -- npy


def _npy(descr: object, shape: tuple[int, ...], body: bytes, version: int = 1) -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin-1")
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + body
    return b"\x93NUMPY\x02\x00" + struct.pack("<L", len(header)) + header + body


def test_npy_passes_and_every_prefix_fails() -> None:
    data = _npy("<f8", (3, 4), b"\0" * 96)
    assert verdict("a.npy", data) == Verdict(True, "npy")
    assert_truncations_fail("a.npy", data)
    assert verdict("a.npy", _npy("<f8", (3, 4), b"\0" * 96, version=2)).ok is True
    assert verdict("a.npy", data + b"\0").ok is False


@pytest.mark.parametrize(
    ("descr", "size"),
    [
        ("<f4", 4),
        ("|b1", 1),
        ("|u1", 1),
        ("<c16", 16),
        ("<U5", 20),
        ("|S7", 7),
        ("|V12", 12),
        ("<M8[ns]", 8),
        ("<m8[s]", 8),
        ([("x", "<i4"), ("y", "<f8", (2, 3))], 52),
        ([("", "|V4"), ("n", [("a", "<i2"), ("b", "|u1")])], 7),
    ],
)
def test_npy_item_sizes(descr: object, size: int) -> None:
    assert format_checks._itemsize(descr) == size


def test_npy_zero_sized_and_object_arrays() -> None:
    assert verdict("e.npy", _npy("<f4", (0, 5), b"")).ok is True
    obj = _npy("|O", (2,), pickle.dumps([1, "a"], protocol=3))
    assert verdict("o.npy", obj).ok is True
    assert verdict("o.npy", obj[:-1]).ok is False


# -- HDF5 (superblocks written by hand; h5py's own in the writers' tests)


def _hdf5_v0(size: int, base: int = 0) -> bytes:
    sb = format_checks.HDF5_MAGIC + bytes([0, 0, 0, 0, 0, 8, 8, 0]) + struct.pack("<HHL", 4, 16, 0)
    sb += struct.pack("<4Q", base, 2**64 - 1, size, 2**64 - 1)
    head = b"U" * base + sb
    return head + b"\0" * (size - len(head))


def _hdf5_v3(size: int, flags: int = 0) -> bytes:
    sb = (
        format_checks.HDF5_MAGIC
        + bytes([3, 8, 8, flags])
        + struct.pack("<4Q", 0, 2**64 - 1, size, 48)
    )
    sb += b"\0\0\0\0"
    return sb + b"\0" * (size - len(sb))


def test_hdf5_superblock_end_of_file_address_is_the_size() -> None:
    assert verdict("w.h5", _hdf5_v0(4096)) == Verdict(True, "hdf5")
    assert verdict("w.h5", _hdf5_v3(4096)).ok is True
    assert_truncations_fail("w.h5", _hdf5_v0(2048))
    assert verdict("w.h5", _hdf5_v0(4096) + b"\0").ok is False


def test_hdf5_with_a_user_block_is_found_by_its_name() -> None:
    data = _hdf5_v0(4096, base=512)
    assert verdict("w.hdf5", data).ok is True
    assert verdict("w.dat", data).ok is None  # no magic at 0, no HDF5 name: not recognised
    assert verdict("w.hdf5", data[:3000]).ok is False


def test_hdf5_marked_open_for_writing_fails() -> None:
    got = verdict("w.h5", _hdf5_v3(4096, flags=1))
    assert got.ok is False and "open for writing" in got.reason


# -- pickle


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickles_pass_and_every_prefix_fails(protocol: int) -> None:
    data = pickle.dumps({"step": 3, "w": [1.5] * 40, "b": b"\x2e" * 30}, protocol=protocol)
    assert verdict("state.pkl", data) == Verdict(True, "pickle")
    assert_truncations_fail("state.pkl", data)


def test_a_framed_pickle_is_recognised_whatever_its_name() -> None:
    data = pickle.dumps(list(range(100)), protocol=5)
    assert verdict("state.dat", data).check == "pickle"
    assert verdict("state.dat", pickle.dumps(list(range(100)), protocol=2)).ok is None


def test_a_large_pickle_is_checked_by_its_last_byte() -> None:
    data = pickle.dumps([bytes([i % 251]) * 1000 + bytes([i % 7]) for i in range(2000)], protocol=2)
    assert len(data) > format_pickle.SMALL_PICKLE
    assert verdict("big.pkl", data).ok is True
    assert verdict("big.pkl", data[:-1]).ok is False
    framed = pickle.dumps({"w": bytes(2 << 20)}, protocol=5)  # ends unframed after the payload
    assert verdict("big.pkl", framed).ok is True


def test_pickles_one_after_another_pass() -> None:
    data = pickle.dumps(1, protocol=2) + pickle.dumps({"a": 2}, protocol=4)
    assert verdict("two.pkl", data).ok is True


# -- JSON


def test_json_parses_and_its_prefixes_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    data = json.dumps({"global_step": 12, "log_history": [{"loss": 0.5}] * 20}, indent=2).encode()
    assert verdict("trainer_state.json", data) == Verdict(True, "json")
    assert verdict("_CHECKPOINT_METADATA", data).check == "json"
    assert_truncations_fail("trainer_state.json", data)
    assert verdict("bom.json", b"\xef\xbb\xbf" + data).ok is True
    monkeypatch.setattr(format_checks, "JSON_CAP", 10)
    assert verdict("trainer_state.json", data).ok is None


# -- reading through a descriptor


def test_a_pinned_descriptor_is_checked_not_what_replaced_the_name(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    whole = _zip({"w": b"w" * 5000})
    path.write_bytes(whole)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 123, os.SEEK_SET)
        (tmp_path / "new").write_bytes(whole[:3000])
        os.replace(tmp_path / "new", path)  # a torn file renamed over the name
        assert formats.check_file(path).ok is False
        assert formats.check_file(path, fd=fd).ok is True
        assert os.lseek(fd, 0, os.SEEK_CUR) == 123  # its offset is untouched
    finally:
        os.close(fd)


def test_size_limits_the_check_to_what_was_pinned(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    whole = _safetensors({"a": (b"\1" * 64, "F32", [16])})
    path.write_bytes(whole + b"appended later")
    assert formats.check_file(path).ok is False
    with path.open("rb") as f:
        assert formats.check_file(path, fd=f.fileno(), size=len(whole)).ok is True


def test_a_missing_file_is_not_checked(tmp_path: Path) -> None:
    got = formats.check_file(tmp_path / "gone.pt")
    assert got.ok is None and "not readable" in got.reason


def test_a_fifo_is_not_waited_on(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.pt")
    assert formats.check_file(tmp_path / "pipe.pt").reason == "not a regular file"


class Chunks:
    """A Source over fixed-size chunks that counts the chunks it fetched."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk, self.fetched = data, chunk, set()

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, len(self.data))
        self.fetched.update(range(offset // self.chunk, (end - 1) // self.chunk + 1))
        return self.data[offset:end]


def test_a_stored_file_is_checked_from_a_few_of_its_chunks() -> None:
    data = _zip({f"t{i}": os.urandom(1 << 20) for i in range(8)})
    src = Chunks(data, 1 << 16)
    assert formats.DEFAULT.check_source("model.pt", src).ok is True
    total = -(-len(data) // src.chunk)
    assert len(src.fetched) <= 12, (len(src.fetched), total)  # head, tail, one per member header


# -- user command checks


def test_a_check_spec_is_glob_equals_command() -> None:
    check = CommandCheck.parse("*.msgpack=sh -c 'exit 0'", timeout=5)
    assert check.glob == "*.msgpack"
    assert check.argv == ("sh", "-c", "exit 0")
    assert check.matches("a/b/x.msgpack") and not check.matches("x.msgpack.tmp")
    deep = CommandCheck.parse("shards/*.bin=true")
    assert deep.matches("shards/0.bin") and not deep.matches("0.bin")


@pytest.mark.parametrize(
    "spec",
    ["*.msgpack", "=true", "*.x=", "*.x=sh -c 'unclosed", "*.x=no-such-program-ckpt-test"],
)
def test_a_bad_check_spec_is_one_clear_line_naming_the_flag(spec: str) -> None:
    with pytest.raises(ConfigError) as e:
        CommandCheck.parse(spec)
    assert "--check" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_config_table_check_takes_an_argv_list() -> None:
    check = CommandCheck.of("*.bin", ["sh", "-c", 'test -s "$1"', "sh", "{}"])
    assert check.argv_for("/x") == ["sh", "-c", 'test -s "$1"', "sh", "/x"]
    with pytest.raises(ConfigError, match=r"\[checks\]"):
        CommandCheck.of("*.bin", [])


def test_a_command_decides_for_the_files_it_matches(tmp_path: Path) -> None:
    ok = tmp_path / "good.custom"
    ok.write_bytes(b"WHOLE")
    bad = tmp_path / "bad.custom"
    bad.write_bytes(b"HALF")
    script = 'head -c 5 "$1" | grep -q WHOLE || { printf "not whole\\033[31m\\n" >&2; exit 3; }'
    reg = Registry([CommandCheck.of("*.custom", ["sh", "-c", script, "sh"])])
    assert reg.check_file(ok) == Verdict(True, "command:*.custom")
    got = reg.check_file(bad)
    assert got.ok is False
    assert "exited 3: not whole" in got.reason
    assert "\033" not in got.reason  # the command's output is outside text
    (tmp_path / "x.pt").write_bytes(b"PK\x03")
    assert reg.check_file(tmp_path / "x.pt").ok is False  # not matched: built-ins apply


def test_a_command_reads_the_pinned_inode_and_knows_the_name(tmp_path: Path) -> None:
    path = tmp_path / "w.custom"
    path.write_bytes(b"WHOLE")
    script = 'test "$CKPT_CHECK_FILE" = sub/w.custom && head -c 5 "$1" | grep -q WHOLE'
    reg = Registry([CommandCheck.of("*.custom", ["sh", "-c", script, "sh"])])
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        path.write_bytes(b"")  # truncated in place after the pin: the inode changed
        assert reg.check_file(path, rel="sub/w.custom").ok is False
        path.write_bytes(b"WHOLE")
        os.replace(path, tmp_path / "moved")
        (tmp_path / "w.custom").write_bytes(b"HALF")  # a new file under the name
        assert reg.check_file(path, rel="sub/w.custom", fd=fd).ok is True
    finally:
        os.close(fd)


def test_a_command_past_its_timeout_fails_and_its_group_is_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = f"sleep 60 & echo $! > {pidfile}; wait"
    reg = Registry([CommandCheck.of("*.slow", ["sh", "-c", script, "sh"], timeout=1)])
    (tmp_path / "a.slow").write_bytes(b"")
    got = reg.check_file(tmp_path / "a.slow")
    assert got.ok is False and "--check-timeout" in got.reason
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 30
    while _alive(grandchild):
        assert time.monotonic() < deadline, "the check's background process survived"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_builtin_checks_off_leaves_user_checks_on(tmp_path: Path) -> None:
    (tmp_path / "m.pt").write_bytes(b"PK")
    (tmp_path / "a.custom").write_bytes(b"")
    reg = Registry(
        [CommandCheck.of("*.custom", [sys.executable, "-c", "raise SystemExit(1)"])], builtin=False
    )
    assert reg.check_file(tmp_path / "m.pt").ok is None
    assert reg.check_file(tmp_path / "a.custom").ok is False
    assert reg.check_tree(scan(tmp_path)) == {}


# -- directory formats


def test_hf_trainer_checkpoint_needs_its_trainer_state() -> None:
    saving = ["config.json", "model.safetensors", "training_args.bin", "optimizer.pt"]
    got = check_dir("out/checkpoint-4", saving)
    assert got.ok is False and "trainer_state.json" in got.reason
    assert check_dir("out/checkpoint-4", [*saving, "trainer_state.json"]) == Verdict(
        True, "hf-trainer"
    )


def test_hf_trainer_first_weights_are_told_by_a_sibling_checkpoint() -> None:
    first = ["config.json", "model.safetensors"]
    assert check_dir("checkpoint-2", first).ok is None  # could be anyone's checkpoint-N
    siblings = {"checkpoint-1": ["model.safetensors", "trainer_state.json"]}
    assert check_dir("checkpoint-2", first, siblings=siblings).ok is False


def test_other_checkpoint_n_dirs_are_not_taken_for_the_trainer() -> None:
    accelerate = ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"]
    assert check_dir("checkpoint-3", accelerate).ok is None
    assert check_dir("ckpt-3", ["optimizer.pt"]).ok is None


def test_hf_trainer_saving_again_into_a_checkpoint_is_in_progress() -> None:
    names = ["model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"]
    again = check_dir("checkpoint-8", names, changed={"checkpoint-8/optimizer.pt"})
    assert again.ok is False and "optimizer.pt" in again.reason
    done = {"checkpoint-8/optimizer.pt", "checkpoint-8/trainer_state.json"}
    assert check_dir("checkpoint-8", names, changed=done).ok is True


def test_torch_dcp_needs_its_metadata() -> None:
    data = ["__0_0.distcp", "__1_0.distcp"]
    assert check_dir("dcp/step-10", data).ok is False
    assert check_dir("dcp/step-10", [*data, ".metadata"]) == Verdict(True, "torch-dcp")
    assert check_dir("s", [*data, "__0.metadata"]).ok is False  # rank 1's is missing
    assert check_dir("s", [*data, "__0.metadata", "__1.metadata"]).ok is True
    changed = {"s/__0_0.distcp"}
    assert check_dir("s", [*data, ".metadata"], changed=changed).ok is False
    assert check_dir("s", [*data, ".metadata"], changed={*changed, "s/.metadata"}).ok is True


def test_orbax_steps_with_the_commit_file_convention() -> None:
    step = ["_CHECKPOINT_METADATA", "default"]
    assert check_dir("100", step) == Verdict(True, "orbax")  # rename convention
    committed = {"100": [*step, "commit_success.txt"]}
    assert check_dir("200", step, siblings=committed).ok is False
    assert check_dir("200", ["default"], siblings=committed).ok is False
    assert check_dir("200", [*step, "commit_success.txt"], siblings=committed).ok is True
    assert check_dir("notes", ["a.txt"], siblings=committed).ok is None


def test_check_tree_takes_the_snapshotter_scan(tmp_path: Path) -> None:
    for rel in [
        "out/checkpoint-2/trainer_state.json",
        "out/checkpoint-2/optimizer.pt",
        "out/checkpoint-4/model.safetensors",
        "dcp/__0_0.distcp",
        "logs/run.log",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    got = formats.check_tree(scan(tmp_path))
    assert set(got) == {"out/checkpoint-2", "out/checkpoint-4", "dcp"}
    assert got["out/checkpoint-2"].ok is True
    assert got["out/checkpoint-4"].ok is False  # its sibling says it is the Trainer's
    assert got["dcp"].ok is False
    assert formats.check_path(tmp_path / "out" / "checkpoint-4").ok is False
