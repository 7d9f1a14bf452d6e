"""The runnable examples under the real `ckpt` binary.

Each example runs once uninterrupted and once interrupted half-way (exit 75
via ckpt.RecoverableError or sys.exit, or a SIGKILL of the child); the
interrupted run must resume from a saved step (not from zero) and end with
the same result, and the state left in the remote must be the final one.
The framework adapters' preemption path (SIGUSR1 to ckpt -> save at the next
batch/step end -> commit) and their resume helpers are tested here too.
Framework tests skip when the framework is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

try:
    from integration._util import manifest_paths, read_tree, restore_into, run_ckpt
except ImportError:  # pragma: no cover - pytest's importlib import mode
    from tests.integration._util import manifest_paths, read_tree, restore_into, run_ckpt

pytestmark = pytest.mark.timeout(240)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PY = sys.executable
#: One ckpt invocation around an example (two attempts of a framework script).
RUN_TIMEOUT = 180.0

#: Every child: no network (Hugging Face offline), the torch backend for Keras,
#: one thread each (two workers share two cores; same math in every run).
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "KERAS_BACKEND": "torch",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

#: The env knob that sets (or, with 0, disables) each example's interruption.
FAIL_KNOB = {
    "epoch_loss": "FAIL_AT_EPOCH",
    "epoch_files": "FAIL_AT_EPOCH",
    "torch_mlp": "FAIL_AT_STEP",
    "lightning": "FAIL_AT_STEP",
    "hf_trainer": "FAIL_AT_STEP",
    "keras": "FAIL_AT_STEP",
}
PURE_PYTHON = ("epoch_loss", "epoch_files")
#: Modules an example needs beyond the standard library.
NEEDS = {
    "torch_mlp": ["torch"],
    "lightning": ["torch", "lightning"],
    "hf_trainer": ["torch", "transformers", "accelerate"],
    "keras": ["torch", "keras"],
}


class Outcome:
    """One `ckpt run` of an example, finished with exit 0."""

    def __init__(self, base: Path, proc: subprocess.CompletedProcess[str]) -> None:
        self.base = base
        self.ck = base / "ck"
        self.remote = base / "remote"
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        result_file = base / "result.json"
        assert result_file.exists(), f"no result written\nstdout:\n{proc.stdout}\n{proc.stderr}"
        self.result: dict[str, Any] = json.loads(result_file.read_text())


def run_args(base: Path, script: Path) -> list[str]:
    """`ckpt run` of `python script` with base/ck as --dir and base/remote as --remote."""
    return [
        *("run", "--dir", str(base / "ck"), "--remote", str(base / "remote")),
        *("--backoff", "0", "--debounce", "0.2", "--", PY, str(script)),
    ]


def run_example(base: Path, name: str, env: dict[str, str]) -> Outcome:
    base.mkdir(parents=True, exist_ok=True)
    full_env = {**CHILD_ENV, "RESULT_FILE": str(base / "result.json"), **env}
    proc = run_ckpt(
        run_args(base, EXAMPLES / name / "train.py"), cwd=base, env=full_env, timeout=RUN_TIMEOUT
    )
    assert proc.returncode == 0, (
        f"ckpt run of {name} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
        f"stderr:\n{proc.stderr}"
    )
    return Outcome(base, proc)


_baselines: dict[str, Outcome] = {}


def baseline(name: str, factory: pytest.TempPathFactory) -> Outcome:
    """The uninterrupted run of an example (once per worker process)."""
    if name not in _baselines:
        plain = run_example(factory.mktemp(f"{name}-plain"), name, {FAIL_KNOB[name]: "0"})
        assert plain.result["attempt"] == 1, plain.stderr
        assert plain.result["start_step"] == 0
        assert "attempt 2" not in plain.stderr
        assert_remote_holds_final_state(plain)
        _baselines[name] = plain
    return _baselines[name]


def need(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip unless the example's frameworks import (Keras with the torch backend)."""
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    for module in NEEDS.get(name, []):
        pytest.importorskip(module)


def assert_remote_holds_final_state(run: Outcome) -> None:
    """The newest snapshot in the remote is exactly the final local directory;
    so is the snapshot the example's last commit returned, if it reports one
    (the adapters commit after the save, not before it)."""
    final = read_tree(run.ck)
    restore_into(run.remote, run.base / "newest", cwd=run.base)
    assert read_tree(run.base / "newest") == final
    if "snapshot" in run.result:
        snapshot = run.result["snapshot"]
        assert snapshot, f"the example's adapter never committed\n{run.stderr}"
        restore_into(run.remote, run.base / "committed", cwd=run.base, snapshot=snapshot)
        assert read_tree(run.base / "committed") == final


def check_resumed(name: str, run: Outcome, plain: Outcome, *, how: str) -> None:
    r, p = run.result, plain.result
    assert r["attempt"] == 2, f"expected exactly one retry\n{run.stderr}"
    assert how in run.stderr, run.stderr
    m = re.search(r"^attempt 2: starting .*?from step (\d+)", run.stdout, re.MULTILINE)
    assert m, f"attempt 2 did not say where it started:\n{run.stdout}"
    resumed_at = int(m.group(1))
    assert resumed_at == r["start_step"]
    assert 0 < resumed_at < p["steps"], f"attempt 2 restarted from {resumed_at}, not a saved step"
    assert r["steps"] == p["steps"]
    if name in PURE_PYTHON:  # no library in the way: the very same floats
        assert r["loss"] == p["loss"], (r, p)
    else:  # same data order and state restored exactly: the same numbers, to float noise
        assert r["loss"] == pytest.approx(p["loss"], rel=1e-5, abs=1e-7), (r, p)
    assert_remote_holds_final_state(run)


# ---------------------------------------------------------------- the examples


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("epoch_loss", "recoverable"),
        ("epoch_loss", "kill"),
        ("epoch_files", "exit"),
        ("epoch_files", "kill"),
        ("torch_mlp", "recoverable"),
        ("torch_mlp", "kill"),
        ("lightning", "recoverable"),
        ("hf_trainer", "recoverable"),
        ("keras", "recoverable"),
    ],
)
def test_interrupted_example_resumes_to_the_same_result(
    name: str,
    mode: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    need(name, monkeypatch)
    plain = baseline(name, tmp_path_factory)
    run = run_example(tmp_path / "interrupted", name, {"FAIL_MODE": mode})
    how = "attempt 1: killed by SIGKILL" if mode == "kill" else "attempt 1: exit code 75"
    check_resumed(name, run, plain, how=how)


def test_epoch_files_restores_from_the_remote_and_finds_nothing_left(tmp_path: Path) -> None:
    """With the local directory gone, the run restores the newest snapshot
    (no explicit commit: the files were uploaded as they appeared) and ends at
    once with the same result."""
    first = run_example(tmp_path / "run", "epoch_files", {})
    assert first.result["attempt"] == 2
    shutil.rmtree(first.ck)
    (tmp_path / "run" / "result.json").unlink()
    again = run_example(tmp_path / "run", "epoch_files", {})
    # The repository's run history counts on: attempts 1 and 2 were the first run's.
    assert again.result["attempt"] == 3
    assert again.result["start_step"] == first.result["steps"], again.stdout
    assert again.result["loss"] == first.result["loss"]
    assert (
        again.result["files"]
        == first.result["files"]
        == [
            "epoch-10.json",
            "epoch-11.json",
            "epoch-12.json",
        ]
    )


def test_torch_save_commits_each_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ckpt.torch.save returns the id of a snapshot that holds exactly the file
    just written (the commit came after the rename)."""
    need("torch_mlp", monkeypatch)
    run = run_example(tmp_path / "run", "torch_mlp", {"FAIL_AT_STEP": "0", "EPOCHS": "2"})
    ids = re.findall(r"^epoch \d+: loss \S+ \(snapshot (\w+)\)$", run.stdout, re.MULTILINE)
    assert len(ids) == 2, run.stdout
    assert all(i != "None" for i in ids)
    restore_into(run.remote, tmp_path / "at-last-save", cwd=tmp_path, snapshot=ids[-1])
    assert (tmp_path / "at-last-save" / "state.pt").read_bytes() == (
        run.ck / "state.pt"
    ).read_bytes()
    assert [p.name for p in run.ck.iterdir()] == ["state.pt"], "a temp file was left behind"


#: Saves a state, then an object that fails to pickle half-way through.
TORCH_FAILED_SAVE = """
import os, sys, warnings
import ckpt.torch
warnings.simplefilter("ignore")  # not under ckpt run: commit() only warns
ckpt.torch.save({"step": 1, "blob": b"x" * 100000}, "sub/state.pt")
try:
    ckpt.torch.save({"step": 2, "blob": b"y" * 100000, "bad": lambda: 0}, "sub/state.pt")
except Exception as exc:
    print("save failed:", type(exc).__name__)
print(ckpt.torch.load("sub/state.pt")["step"], ckpt.torch.load("missing.pt"))
"""


def test_torch_save_failure_leaves_the_previous_file(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    ck = tmp_path / "ck"
    proc = subprocess.run(
        [PY, "-c", TORCH_FAILED_SAVE],
        cwd=tmp_path,
        env={**os.environ, "CKPT_DIR": str(ck)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "save failed:" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "1 None", proc.stdout
    assert [p.name for p in (ck / "sub").iterdir()] == ["state.pt"], "temp file left behind"


#: Rewrites a private state.pt under a permissive umask.
TORCH_PRIVATE_SAVE = """
import os, warnings
import ckpt.torch
warnings.simplefilter("ignore")  # not under ckpt run: commit() only warns
os.umask(0o022)
ckpt.torch.save({"step": 1}, "state.pt")
os.chmod(ckpt.torch.path("state.pt"), 0o600)
ckpt.torch.save({"step": 2}, "state.pt")
mode = os.stat(ckpt.torch.path("state.pt")).st_mode & 0o7777
print(oct(mode), ckpt.torch.load("state.pt")["step"])
ckpt.torch.save({"step": 3}, "fresh.pt")
print(oct(os.stat(ckpt.torch.path("fresh.pt")).st_mode & 0o7777))
"""


def test_torch_save_keeps_a_private_checkpoint_private(tmp_path: Path) -> None:
    """The temp file that is renamed over state.pt gets state.pt's mode, not
    the umask's default: a 0600 checkpoint rewritten stays 0600 (it used to
    become 0644, readable by everyone on the machine)."""
    pytest.importorskip("torch")
    ck = tmp_path / "ck"
    proc = subprocess.run(
        [PY, "-c", TORCH_PRIVATE_SAVE],
        cwd=tmp_path,
        env={**os.environ, "CKPT_DIR": str(ck)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["0o600 2", "0o644"], proc.stdout
    assert sorted(p.name for p in ck.iterdir()) == ["fresh.pt", "state.pt"]


def test_torch_path_stays_inside_the_checkpoint_dir() -> None:
    pytest.importorskip("torch")
    import ckpt.torch

    for bad in ("../escape.pt", "/abs/state.pt", ""):
        with pytest.raises(ValueError, match="relative"):
            ckpt.torch.path(bad)


# ---------------------------------------------------------------- preemption

#: Shared by the preemption children: at step 3, ask `ckpt` (our parent) for
#: the checkpoint signal as a cloud preemption notice would, and wait until it
#: has arrived, so the adapter acts at this batch end or the next.
PREEMPT_AT_3 = """
import json, os, pickle, signal, sys, time
import ckpt

def preempt_now():
    os.kill(os.getppid(), signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while not ckpt.preemption_requested():
        if time.monotonic() > deadline:
            sys.exit("the checkpoint signal never arrived")
        time.sleep(0.01)

def report(**fields):
    with open(os.environ["RESULT_FILE"], "w") as f:
        json.dump(fields, f)
"""

LIGHTNING_CHILD = (
    PREEMPT_AT_3
    + """
import torch
import lightning.pytorch as pl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import ckpt.lightning

class M(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

class Preempt(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            preempt_now()

# A pickled copy (as a spawn launcher makes) must listen for the signal itself.
cb = pickle.loads(pickle.dumps(ckpt.lightning.CkptCallback()))
data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[Preempt(), cb])
trainer.fit(M(), DataLoader(data, batch_size=8))
report(snapshot=cb.last_snapshot, resume=ckpt.lightning.resume_path())
"""
)

HF_CHILD = (
    PREEMPT_AT_3
    + """
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,
                          TrainingArguments)
import ckpt.hf

class Preempt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            preempt_now()

class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 32
    def __getitem__(self, i):
        ids = torch.arange(8) * (i + 1) % 32
        return {"input_ids": ids, "labels": ids}

model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2))
cb = pickle.loads(pickle.dumps(ckpt.hf.CkptCallback()))
args = TrainingArguments(output_dir=str(ckpt.checkpoint().path), max_steps=6,
                         per_device_train_batch_size=4, save_strategy="no",
                         report_to="none", use_cpu=True, disable_tqdm=True)
Trainer(model=model, args=args, train_dataset=Data(), callbacks=[Preempt(), cb]).train()
report(snapshot=cb.last_snapshot, resume=ckpt.hf.resume_from_checkpoint())
"""
)

KERAS_CHILD = (
    PREEMPT_AT_3
    + """
import keras
import numpy as np
import ckpt.keras

class Preempt(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 2:  # the third step
            preempt_now()

model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
cb = pickle.loads(pickle.dumps(ckpt.keras.CkptCallback()))
x, y = np.zeros((64, 4), "float32"), np.zeros((64, 1), "float32")
model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[Preempt(), cb])
report(snapshot=cb.last_snapshot, resume=ckpt.keras.resume_path())
"""
)


def run_preemption_child(tmp_path: Path, body: str) -> tuple[dict[str, Any], Path, Path, str]:
    script = tmp_path / "child.py"
    script.write_text(body)
    ck, remote, result = tmp_path / "ck", tmp_path / "remote", tmp_path / "result.json"
    proc = run_ckpt(
        run_args(tmp_path, script),
        cwd=tmp_path,
        env={**CHILD_ENV, "RESULT_FILE": str(result)},
        timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert result.exists(), proc.stderr
    return json.loads(result.read_text()), ck, remote, proc.stderr


def snapshot_files(remote: Path, snapshot: str) -> dict[str, int]:
    """path -> size of the files in the named snapshot's manifest."""
    found = [p for p in manifest_paths(remote) if p.stem.endswith(f"-{snapshot}")]
    assert len(found) == 1, f"snapshot {snapshot} not in {manifest_paths(remote)}"
    doc = json.loads(found[0].read_text())
    return {e["path"]: e.get("size", 0) for e in doc["entries"] if e["type"] == "file"}


def snapshot_step(remote: Path, snapshot: str) -> int | None:
    """The training step the named snapshot's commit was tagged with."""
    [found] = [p for p in manifest_paths(remote) if p.stem.endswith(f"-{snapshot}")]
    step: int | None = json.loads(found.read_text()).get("step")
    return step


def test_lightning_preemption_saves_and_commits(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("lightning")
    import torch

    out, ck, remote, stderr = run_preemption_child(tmp_path, LIGHTNING_CHILD)
    saved = ck / "preempted.ckpt"
    assert out["resume"] == str(saved)
    assert torch.load(saved, weights_only=False)["global_step"] == 3
    assert out["snapshot"], "the preemption save was not committed"
    assert snapshot_files(remote, out["snapshot"]) == {"preempted.ckpt": saved.stat().st_size}
    assert snapshot_step(remote, out["snapshot"]) == 3, "committed with the trainer's step"
    assert "ckpt: preemption warning: saved" in stderr
    assert not [p for p in ck.iterdir() if p.name != "preempted.ckpt"], "temp file left behind"


def test_hf_preemption_saves_and_commits(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    out, ck, remote, stderr = run_preemption_child(tmp_path, HF_CHILD)
    assert out["resume"] == str(ck / "checkpoint-3"), "save_strategy='no', yet a save at step 3"
    assert out["snapshot"], "the save was not committed"
    files = snapshot_files(remote, out["snapshot"])
    assert "checkpoint-3/trainer_state.json" in files
    assert snapshot_step(remote, out["snapshot"]) == 3, "committed with the trainer's step"
    state = json.loads((ck / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert "ckpt: preemption warning: saving checkpoint-3" in stderr


def test_keras_preemption_saves_and_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    pytest.importorskip("keras")

    out, ck, remote, stderr = run_preemption_child(tmp_path, KERAS_CHILD)
    saved = ck / "preempted.keras"
    assert out["resume"] == str(saved)
    assert zipfile.is_zipfile(saved)
    assert out["snapshot"], "the preemption save was not committed"
    assert snapshot_files(remote, out["snapshot"]) == {"preempted.keras": saved.stat().st_size}
    assert "ckpt: preemption warning: saved" in stderr


# ---------------------------------------------------------------- resume helpers


def _age(path: Path, seconds_ago: int) -> None:
    t = 1_700_000_000 - seconds_ago
    os.utime(path, (t, t))


def test_hf_resume_skips_incomplete_checkpoints(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import ckpt.hf

    assert ckpt.hf.resume_from_checkpoint(tmp_path / "missing") is None
    assert ckpt.hf.resume_from_checkpoint(tmp_path) is None

    def make(name: str, state: str | None) -> None:
        d = tmp_path / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"weights")
        if state is not None:
            (d / "trainer_state.json").write_text(state)

    make("checkpoint-2", '{"global_step": 2}')
    make("checkpoint-10", '{"global_step": 10}')  # 10 > 2 numerically, not as text
    assert ckpt.hf.resume_from_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    make("checkpoint-12", '{"global_st')  # trainer_state.json cut short
    make("checkpoint-14", None)  # the save was interrupted before trainer_state.json
    make("tmp-checkpoint-16", '{"global_step": 16}')  # not a checkpoint-N name
    (tmp_path / "checkpoint-18").write_text("a file, not a directory")
    assert ckpt.hf.resume_from_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert ckpt.hf.resume_from_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")


def test_lightning_resume_path_skips_partial_files(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    import torch

    import ckpt.lightning

    assert ckpt.lightning.resume_path(tmp_path / "missing") is None
    assert ckpt.lightning.resume_path(tmp_path) is None
    older, newer = tmp_path / "epoch=9-step=90.ckpt", tmp_path / "sub" / "last.ckpt"
    newer.parent.mkdir()
    torch.save({"global_step": 90}, older)
    torch.save({"global_step": 120}, newer)
    _age(older, 50)
    _age(newer, 40)
    assert ckpt.lightning.resume_path(tmp_path) == str(newer)  # newest, found below too

    whole = newer.read_bytes()
    cut = tmp_path / "epoch=12-step=130.ckpt"
    cut.write_bytes(whole[: len(whole) // 2])  # a crash mid-write
    _age(cut, 30)
    empty = tmp_path / "epoch=13-step=140.ckpt"
    empty.touch()
    _age(empty, 20)
    temp = tmp_path / ".preempted.ckpt.tmp"
    temp.write_bytes(whole)
    _age(temp, 10)
    hidden_tmp = tmp_path / "x.tmp" / "inside.ckpt"  # below a temp-named dir
    hidden_tmp.parent.mkdir()
    hidden_tmp.write_bytes(whole)
    _age(hidden_tmp, 5)
    assert ckpt.lightning.resume_path(tmp_path) == str(newer)


def test_keras_resume_path_skips_partial_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    pytest.importorskip("keras")
    import ckpt.keras

    assert ckpt.keras.resume_path(tmp_path) is None

    def keras_file(name: str, seconds_ago: int) -> Path:
        p = tmp_path / name
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("config.json", "{}")
            z.writestr("model.weights.h5", b"\0" * 4096)
        _age(p, seconds_ago)
        return p

    keras_file("epoch-001.keras", 50)
    good = keras_file("epoch-002.keras", 40)
    assert ckpt.keras.resume_path(tmp_path) == str(good)
    cut = keras_file("epoch-003.keras", 30)
    cut.write_bytes(cut.read_bytes()[:100])
    _age(cut, 30)
    keras_file(".preempted.keras.tmp.keras", 10)
    assert ckpt.keras.resume_path(tmp_path) == str(good)
