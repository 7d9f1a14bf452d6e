"""formats against the real writers of the test group: every whole file that
torch (zip and legacy), safetensors, numpy, h5py, Keras, the HF Trainer,
Lightning and torch.distributed.checkpoint write passes its check (zero
false positives), and every prefix of it fails: every byte for small files,
every write boundary of torch.save (a file object that records them) and a
dense sample for larger ones. Frameworks that need their own process
(Keras's backend, the Trainer, Lightning) write in a child; a library
that is absent makes its tests skip."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from ckpt_cli import formats
from ckpt_cli.formats import BytesSource, Verdict
from ckpt_cli.snapshotter import scan


def verdict(name: str, data: bytes) -> Verdict:
    return formats.DEFAULT.check_source(name, BytesSource(data))


def assert_whole(path: Path, check: str) -> bytes:
    got = formats.check_file(path)
    assert got == Verdict(True, check), (path.name, got)
    return path.read_bytes()


def assert_prefixes_fail(name: str, data: bytes, points: Iterable[int]) -> int:
    """The prefixes of data at `points` all fail; returns how many were tried.
    (A JSON prefix that only lacks trailing whitespace is whole: skipped.)"""
    tried = 0
    whole_text = len(data.rstrip()) if name.endswith(".json") else len(data)
    for n in sorted(set(points)):
        if 0 <= n < whole_text:
            got = verdict(name, data[:n])
            assert got.ok is False, (name, n, len(data), got)
            tried += 1
    return tried


def dense(size: int, boundaries: Iterable[int] = (), every: int = 997) -> set[int]:
    """Every byte of the first and last 4 KiB, every `every`-th byte, and each
    boundary with its neighbours."""
    points = set(range(min(size, 4096))) | set(range(max(0, size - 4096), size))
    points |= set(range(0, size, every))
    for b in boundaries:
        points |= {b - 1, b, b + 1}
    return points


class Recorder(io.RawIOBase):
    """A writable file that records the offset after each write: where a
    writer killed mid-save leaves the file."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.boundaries: list[int] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = self.buf.write(b)
        self.boundaries.append(self.buf.tell())
        return n

    def tell(self) -> int:
        return self.buf.tell()


def needs(*modules: str) -> None:
    """Skip unless the child can import these (without importing them here)."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not installed")


def run_child(tmp_path: Path, code: str, **env: str) -> None:
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(code))
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=full, check=True, timeout=240)


# -- torch


@pytest.fixture
def torch() -> Any:
    return pytest.importorskip("torch")


def _training_state(torch: Any, width: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 2)
    )
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, width)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "step": 7,
        "half": torch.randn(5).half(),
        "ints": torch.arange(10),
        "mask": torch.ones(3, dtype=torch.bool),
        "bf16": torch.randn(4).bfloat16(),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_save_passes_and_fails_at_every_write_boundary(
    torch: Any, tmp_path: Path, legacy: bool
) -> None:
    rec = Recorder()
    torch.save(_training_state(torch, 64), rec, _use_new_zipfile_serialization=not legacy)
    data = rec.buf.getvalue()
    check = "torch-legacy" if legacy else "zip"
    assert verdict("ckpt.pt", data) == Verdict(True, check)
    assert len(rec.boundaries) > 3
    assert (
        assert_prefixes_fail("ckpt.pt", data, [0, *rec.boundaries[:-1]]) >= len(rec.boundaries) - 1
    )
    assert_prefixes_fail("ckpt.pt", data, dense(len(data), rec.boundaries))
    path = tmp_path / "ckpt.pt"
    torch.save(_training_state(torch, 64), path, _use_new_zipfile_serialization=not legacy)
    assert_whole(path, check)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_byte_of_a_small_torch_file_is_needed(torch: Any, legacy: bool) -> None:
    rec = Recorder()
    torch.save(_training_state(torch, 4), rec, _use_new_zipfile_serialization=not legacy)
    data = rec.buf.getvalue()
    assert verdict("m.pth", data).ok is True
    assert_prefixes_fail("m.pth", data, range(len(data)))


def test_torch_saves_of_modules_and_large_tensors_pass(torch: Any, tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    torch.save(model, tmp_path / "whole.pt", _use_new_zipfile_serialization=False)
    assert_whole(tmp_path / "whole.pt", "torch-legacy")
    torch.save(model, tmp_path / "whole_zip.pt")
    assert_whole(tmp_path / "whole_zip.pt", "zip")
    big = {"w": torch.randn(1 << 20), "v": torch.randn(3, 5)[:, 1:]}  # a view, 4 MiB
    torch.save(big, tmp_path / "big.bin")  # any name: recognised by content
    data = assert_whole(tmp_path / "big.bin", "zip")
    assert_prefixes_fail("big.bin", data, dense(len(data), every=65_537) - set(range(4)))
    assert verdict("big.bin", data[:3]).ok is None  # .bin is raw data too: by content only
    torch.save(big, tmp_path / "big_legacy.pt", _use_new_zipfile_serialization=False)
    data = assert_whole(tmp_path / "big_legacy.pt", "torch-legacy")
    assert_prefixes_fail("big_legacy.pt", data, dense(len(data), every=65_537))
    torch.save(
        [1, 2], tmp_path / "proto4.pt", _use_new_zipfile_serialization=False, pickle_protocol=4
    )
    assert_whole(tmp_path / "proto4.pt", "torch-legacy")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_torch_distributed_checkpoint_dir_needs_its_metadata(torch: Any, tmp_path: Path) -> None:
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    root = tmp_path / "ck"
    dcp.save(_training_state(torch, 8), checkpoint_id=str(root / "step-1"))
    entries = scan(root)
    got = formats.check_tree(entries)
    assert got == {"step-1": Verdict(True, "torch-dcp")}
    for e in entries:
        if e.type == "file":
            assert formats.check_file(root / e.path).ok is not False, e.path
    (root / "step-1" / ".metadata").unlink()
    assert formats.check_tree(scan(root))["step-1"].ok is False


# -- safetensors, numpy, h5py


def test_safetensors_files_pass_and_their_prefixes_fail(torch: Any, tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(7, 3), "b": torch.arange(5), "c": torch.zeros(0)}
    st.save_file(tensors, tmp_path / "small.safetensors", metadata={"format": "pt"})
    data = assert_whole(tmp_path / "small.safetensors", "safetensors")
    assert_prefixes_fail("small.safetensors", data, range(len(data)))
    st.save_file({"w": torch.randn(256, 1024)}, tmp_path / "model.safetensors")
    data = assert_whole(tmp_path / "model.safetensors", "safetensors")
    assert_prefixes_fail("model.safetensors", data, dense(len(data)))


def test_numpy_files_pass_and_their_prefixes_fail(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    arrays = {
        "f4": np.arange(12, dtype=np.float32).reshape(3, 4),
        "fortran": np.asfortranarray(np.ones((3, 5))),
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 4)),
        "text": np.array(["ab", "cde"]),
        "bytes": np.array([b"x", b"yz"]),
        "dates": np.array(["2024-01-01"], dtype="datetime64[ns]"),
        "record": np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8", (2,)), ("c", [("d", "u1")])]),
        "aligned": np.zeros(2, dtype=np.dtype([("a", "u1"), ("b", "<f8")], align=True)),
        "complex": np.ones(3, dtype=np.complex128),
        "bool": np.array([True, False]),
    }
    for name, a in arrays.items():
        path = tmp_path / f"{name}.npy"
        np.save(path, a)
        data = assert_whole(path, "npy")
        assert_prefixes_fail(path.name, data, range(len(data)))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    data = assert_whole(tmp_path / "obj.npy", "npy")
    assert_prefixes_fail("obj.npy", data, range(len(data)))
    np.savez(tmp_path / "plain.npz", **{k: v for k, v in arrays.items() if k != "aligned"})
    np.savez_compressed(tmp_path / "packed.npz", w=np.random.default_rng(0).random(5000))
    for name in ("plain.npz", "packed.npz"):
        data = assert_whole(tmp_path / name, "zip")
        assert_prefixes_fail(name, data, dense(len(data), every=101))


def test_h5py_files_pass_and_their_prefixes_fail(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    np = pytest.importorskip("numpy")
    variants: dict[str, dict[str, Any]] = {
        "default": {},
        "userblock": {"userblock_size": 512},
        "latest": {"libver": "latest"},
        "v110": {"libver": ("v108", "v110")},
    }
    for name, kwargs in variants.items():
        path = tmp_path / f"{name}.h5"
        with h5py.File(path, "w", **kwargs) as f:
            f["x"] = np.arange(1000.0)
            f.create_dataset("z", data=np.ones((64, 64)), chunks=(16, 16), compression="gzip")
            f.create_group("g").attrs["step"] = 3
        data = assert_whole(path, "hdf5")
        assert_prefixes_fail(path.name, data, range(len(data)))


def test_an_h5py_file_open_for_writing_fails(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "w.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f["x"] = [1.0, 2.0]
        f.flush()
        got = formats.check_file(path)
        assert got.ok is False and "open for writing" in got.reason
    assert formats.check_file(path).ok is True
    with h5py.File(path, "a") as f:  # reopened to change it in place
        assert formats.check_file(path).ok is False
    assert formats.check_file(path).ok is True


# -- Keras, HF Trainer, Lightning: in a child of their own


@pytest.mark.slow
def test_keras_files_pass_and_their_prefixes_fail(tmp_path: Path) -> None:
    needs("keras", "torch", "h5py")  # (keras is imported in the child: its backend is torch)
    run_child(
        tmp_path,
        """
        import numpy as np, keras
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
        model.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=1, verbose=0)
        model.save("model.keras")
        model.save("model.h5")
        model.save_weights("model.weights.h5")
        """,
        KERAS_BACKEND="torch",
    )
    for name, check in [("model.keras", "zip"), ("model.h5", "hdf5"), ("model.weights.h5", "hdf5")]:
        data = assert_whole(tmp_path / name, check)
        assert_prefixes_fail(name, data, dense(len(data), every=31))


@pytest.mark.slow
def test_hf_trainer_checkpoints_pass_and_their_parts_are_needed(tmp_path: Path) -> None:
    needs("transformers", "accelerate", "torch")
    run_child(
        tmp_path,
        """
        import torch
        from transformers import BertConfig, BertForSequenceClassification
        from transformers import Trainer, TrainingArguments

        class Data(torch.utils.data.Dataset):
            def __len__(self): return 32
            def __getitem__(self, i):
                return {"input_ids": torch.tensor([4 + i % 8] * 6), "labels": torch.tensor(i % 2)}

        config = BertConfig(
            vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=16, max_position_embeddings=8, num_labels=2,
        )
        args = TrainingArguments(
            output_dir="out", max_steps=4, save_steps=2, per_device_train_batch_size=8,
            report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=2,
        )
        model = BertForSequenceClassification(config)
        Trainer(model=model, args=args, train_dataset=Data()).train()
        """,
    )
    root = tmp_path / "out"
    entries = scan(root)
    dirs = formats.check_tree(entries)
    assert dirs == {n: Verdict(True, "hf-trainer") for n in ("checkpoint-2", "checkpoint-4")}
    checked = {}
    for e in entries:
        if e.type == "file":
            got = formats.check_file(root / e.path, rel=e.path)
            assert got.ok is not False, (e.path, got)
            checked[e.path.rsplit("/", 1)[-1]] = got.check
    assert checked["model.safetensors"] == "safetensors"
    assert checked["trainer_state.json"] == checked["config.json"] == "json"
    assert (
        checked["optimizer.pt"] == checked["training_args.bin"] == checked["rng_state.pth"] == "zip"
    )
    ck = root / "checkpoint-4"
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json", "scheduler.pt"):
        data = (ck / name).read_bytes()
        assert_prefixes_fail(name, data, dense(len(data), every=4093))
    (ck / "trainer_state.json").unlink()
    got = formats.check_tree(scan(root))["checkpoint-4"]
    assert got.ok is False and "trainer_state.json" in got.reason
    assert (
        json.loads((root / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    )


@pytest.mark.slow
def test_lightning_checkpoints_pass_and_their_prefixes_fail(tmp_path: Path) -> None:
    needs("lightning", "torch")
    run_child(
        tmp_path,
        """
        import torch, lightning.pytorch as pl

        class M(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(4, 1)
            def training_step(self, batch, i):
                return self.layer(batch).sum()
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)
            def train_dataloader(self):
                return torch.utils.data.DataLoader(torch.randn(16, 4), batch_size=4)

        trainer = pl.Trainer(
            max_steps=3, default_root_dir="lt", logger=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu",
        )
        trainer.fit(M())
        trainer.save_checkpoint("lt/manual.ckpt")
        """,
    )
    found = sorted((tmp_path / "lt").rglob("*.ckpt"))
    assert len(found) == 2, found
    for path in found:
        data = assert_whole(path, "zip")
        assert_prefixes_fail(path.name, data, dense(len(data), every=127))
