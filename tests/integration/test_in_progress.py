"""Snapshots that load (issue 16, the taking side), through the real binary
with real writers: a file in progress (held open for writing by the job, or
failing its format check) never enters an automatic snapshot, so a machine
that dies during a save restores the last whole version; an appender that
never closes does not hold snapshots back; a commit of a torn file fails
naming it; after --settle-timeout a snapshot is taken anyway, unverified.

Each kill -9 here is the machine dying: `ckpt run` is SIGKILLed in the
writer's pause (its guardian kills the child), then `ckpt restore` into a
fresh directory. Writers signal where they are through files in a `ready`
directory outside --dir; nothing waits for a fixed time.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckpt._contract import ExitCode

from ._util import (
    CKPT,
    PY,
    Running,
    entry,
    manifests,
    newest_manifest,
    pid_gone,
    restore_into,
    run_ckpt,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)

#: The writers: each saves version 1 whole, waits for `go`, then writes
#: version 2 in place and stops half-way for good ("paused" holds its pid):
#: with the file still open ("open"), or after closing what it wrote so far
#: ("closed": only the format check can tell it is torn).
SAVE_IN_PLACE = r"""
import io, os, sys, time
from pathlib import Path

d = Path(os.environ["CKPT_DIR"])
ready, kind, how = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
NAME = {"torch": "model.pt", "safetensors": "model.safetensors", "h5py": "model.h5"}[kind]


def pause():
    (ready / "paused.tmp").write_text(str(os.getpid()))
    os.replace(ready / "paused.tmp", ready / "paused")
    time.sleep(600)  # the machine dies here (the test kills ckpt -9)


class Pausing(io.RawIOBase):
    # A file written in place that stops for good once `at` bytes are written
    # (a slow disk, optimizer state being gathered): torch.save writes into it.
    def __init__(self, path, at):
        self.f = open(path, "wb")
        self.n, self.at = 0, at

    def writable(self):
        return True

    def write(self, b):
        n = self.f.write(b)
        self.n += n
        if self.n >= self.at:
            self.f.flush()
            pause()
        return n


def payload(version):
    if kind == "torch":
        import torch
        buf = io.BytesIO()
        torch.save({"w": torch.full((60_000,), float(version)), "version": version}, buf)
        return buf.getvalue()
    if kind == "safetensors":
        import torch
        from safetensors.torch import save
        return save({"w": torch.full((60_000,), float(version))}, {"version": str(version)})
    import h5py, numpy as np
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_dataset("w", data=np.full(60_000, float(version)))
        f.attrs["version"] = version
    return buf.getvalue()


def save(version, torn=False):
    data = payload(version)
    if not torn:
        (d / NAME).write_bytes(data)  # in place too
        return
    if how == "open" and kind == "torch":
        import torch
        obj = {"w": torch.full((60_000,), float(version)), "version": version}
        torch.save(obj, Pausing(d / NAME, len(data) // 2))  # pauses inside
    with open(d / NAME, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        if how == "open":
            pause()
    pause()


save(1)
(ready / "v1").write_text("")
while not (ready / "go").exists():
    time.sleep(0.02)
save(2, torn=True)
"""


def _load_version(kind: str, path: Path) -> int:
    """The version a restored file holds; raises if it does not load."""
    if kind == "torch":
        torch = pytest.importorskip("torch")
        obj = torch.load(path, weights_only=True)
        return int(obj["version"])
    if kind == "safetensors":
        pytest.importorskip("torch")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return int(f.metadata()["version"])
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "r") as f:
        return int(f.attrs["version"])


def _args(ckpt_dir: Path, remote: Path, *rest: str) -> list[str]:
    return ["run", "--dir", str(ckpt_dir), "--remote", str(remote), *rest]


def _kill_machine(ckpt: Running, child_pid: int) -> None:
    """kill -9 of `ckpt run`; its guardian kills the child's group."""
    ckpt.extra_pids.append(child_pid)
    os.kill(ckpt.pid, signal.SIGKILL)
    ckpt.proc.wait(30)
    wait_for(lambda: pid_gone(child_pid), what="the child to die with its supervisor")


def _waits_or_snapshots(ckpt: Running, remote: Path, name: str, before: int) -> str:
    """Evidence that ckpt looked at the paused state: it says it waits for
    the file (this ckpt), or it took a newer snapshot (a ckpt that does not
    know the file is in progress)."""

    def seen() -> str:
        if f"snapshot waits for {name}" in ckpt.stderr():
            return "waits"
        return "snapshot" if len(manifests(remote)) > before else ""

    return wait_for(seen, what=f"ckpt to judge the paused {name}", proc=ckpt)


@pytest.mark.parametrize("how", ["open", "closed"])
@pytest.mark.parametrize("kind", ["torch", "safetensors", "h5py"])
def test_a_save_in_place_paused_half_way_is_never_what_is_restored(
    spawn: Callable[..., Running],
    tmp_path: Path,
    ckpt_dir: Path,
    remote: Path,
    kind: str,
    how: str,
) -> None:
    """Regression (issue 16, "what goes wrong" 1): version 2 of a model file
    is written in place and stops half-way, for longer than --debounce, with
    the file open or closed; the machine dies (kill -9 of ckpt run). A
    restore gives version 1, whole, never the torn half of version 2."""
    pytest.importorskip("h5py" if kind == "h5py" else "torch")
    ready = tmp_path / "ready"
    ready.mkdir()
    script = tmp_path / "save.py"
    script.write_text(SAVE_IN_PLACE)
    name = {"torch": "model.pt", "safetensors": "model.safetensors", "h5py": "model.h5"}[kind]
    ckpt = spawn(
        _args(ckpt_dir, remote, "--debounce", "0.5", "--", PY, str(script), str(ready), kind, how)
    )
    wait_for((ready / "v1").exists, what="version 1", proc=ckpt)
    first = wait_for(
        lambda: any(entry(m, name) for m in manifests(remote)),
        what="a snapshot of version 1",
        proc=ckpt,
    )
    assert first
    before = len(manifests(remote))
    (ready / "go").write_text("")
    wait_for((ready / "paused").exists, what="the writer's pause", proc=ckpt)
    child = int((ready / "paused").read_text())
    seen = _waits_or_snapshots(ckpt, remote, name, before)
    if seen == "waits" and how == "open":
        assert f"{name} (open for writing by pid {child}" in ckpt.stderr(), ckpt.stderr()
    elif seen == "waits":
        assert f"{name} (fails the " in ckpt.stderr(), ckpt.stderr()
    _kill_machine(ckpt, child)

    out = tmp_path / "restored"
    restore_into(remote, out, cwd=tmp_path)
    try:
        version = _load_version(kind, out / name)
    except Exception as exc:
        raise AssertionError(f"the restored {name} does not load: {exc!r}") from None
    assert version == 1


#: An HF Trainer (tiny BERT, no download) saving every 2 steps; its second
#: save stops for good after the weights are written, before the optimizer
#: and trainer_state.json (no file is open then). It waits for `go` after
#: the first save, so the test can see checkpoint-2 snapshotted.
HF_TRAINER = r"""
import os, sys, time, warnings
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import torch
from transformers import (BertConfig, BertForSequenceClassification, Trainer,
                          TrainerCallback, TrainingArguments, set_seed)
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore")
ready = Path(sys.argv[1])
d = os.environ["CKPT_DIR"]


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"input_ids": torch.tensor([4 + i % 20] * 8), "labels": torch.tensor(i % 2)}


class Gate(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            (ready / "saved-2").write_text("")
            while not (ready / "go").exists():
                time.sleep(0.02)


class Pausing(Trainer):
    def _save_optimizer_and_scheduler(self, output_dir):
        if output_dir.endswith("checkpoint-4"):
            (ready / "paused.tmp").write_text(str(os.getpid()))
            os.replace(ready / "paused.tmp", ready / "paused")
            time.sleep(600)  # the machine dies here
        super()._save_optimizer_and_scheduler(output_dir)


set_seed(0)
config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=8, num_labels=2)
args = TrainingArguments(output_dir=d, max_steps=6, save_steps=2, per_device_train_batch_size=8,
                         report_to=[], logging_strategy="no", use_cpu=True, seed=0)
Pausing(model=BertForSequenceClassification(config), args=args, train_dataset=Data(),
        callbacks=[Gate()]).train()
"""


def test_an_hf_checkpoint_paused_between_its_files_is_never_restored_half(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    """Regression (issue 16, "what goes wrong" 1, HF Trainer): checkpoint-4/
    has model.safetensors but not yet its optimizer or trainer_state.json
    (nothing open) when the machine dies. The restore holds checkpoint-2
    whole and no half checkpoint-4."""
    pytest.importorskip("transformers")
    ready = tmp_path / "ready"
    ready.mkdir()
    script = tmp_path / "hf.py"
    script.write_text(HF_TRAINER)
    ckpt = spawn(_args(ckpt_dir, remote, "--debounce", "0.5", "--", PY, str(script), str(ready)))
    wait_for((ready / "saved-2").exists, what="checkpoint-2", proc=ckpt, timeout=120)
    wait_for(
        lambda: any(entry(m, "checkpoint-2/trainer_state.json") for m in manifests(remote)),
        what="a snapshot of checkpoint-2",
        proc=ckpt,
    )
    before = len(manifests(remote))
    (ready / "go").write_text("")
    wait_for((ready / "paused").exists, what="the pause in checkpoint-4", proc=ckpt)
    assert (ckpt_dir / "checkpoint-4" / "model.safetensors").is_file()
    child = int((ready / "paused").read_text())
    seen = _waits_or_snapshots(ckpt, remote, "checkpoint-4", before)
    if seen == "waits":
        assert "checkpoint-4 (fails the hf-trainer check" in ckpt.stderr(), ckpt.stderr()
    _kill_machine(ckpt, child)

    out = tmp_path / "restored"
    restore_into(remote, out, cwd=tmp_path)
    dirs = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert "checkpoint-2" in dirs
    for name in dirs:
        assert (out / name / "trainer_state.json").is_file(), f"{name} is half a checkpoint"


#: Appends a line to LOG every 0.1 s (opened "a": O_APPEND, open all along,
#: never closed) and saves model.pt atomically (temp + rename) every 0.5 s,
#: versions 1 to SAVES; then goes on appending until `stop` or 50 s.
APPENDER = r"""
import json, os, sys, time
from pathlib import Path

d = Path(os.environ["CKPT_DIR"])
ready, saves, name = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
log = open(d / name, "a", buffering=1)
start = time.monotonic()
version = 0
next_save = start
while time.monotonic() - start < 50 and not (ready / "stop").exists():
    log.write(json.dumps({"t": time.monotonic() - start, "loss": 1.0}) + "\n")
    if version < saves and time.monotonic() >= next_save:
        version += 1
        tmp = d / "model.pt.tmp"
        tmp.write_bytes(b"model version %d\n" % version * 4096)
        os.replace(tmp, d / "model.pt")
        next_save += 0.5
    time.sleep(0.1)
(ready / "appender-stopped").write_text(str(time.monotonic() - start))
log.close()
"""


@pytest.mark.parametrize("log_name", ["metrics.jsonl", "progress.txt"])
def test_an_open_appender_does_not_hold_back_snapshots_of_other_files(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path, log_name: str
) -> None:
    """Regression (issue 16, "what goes wrong" 3): a metrics log appended
    every 0.1 s and never closed, beside model.pt saved atomically. While
    the appender keeps appending, snapshots holding new versions of model.pt
    appear (before: the directory never went quiet, and nothing was
    snapshotted before the 60 s ceiling, after the appender had stopped).
    Each snapshot's log is a prefix of the final log. A log's name
    (metrics.jsonl) tells it at once; a name that is no log's
    (progress.txt), its O_APPEND, once the busy directory is probed."""
    ready = tmp_path / "ready"
    ready.mkdir()
    script = tmp_path / "appender.py"
    script.write_text(APPENDER)
    saves = 30  # one every 0.5 s: 15 s of saves
    ckpt = spawn(
        _args(
            ckpt_dir,
            remote,
            "--debounce",
            "0.3",
            "--keep",
            "100",
            "--",
            PY,
            str(script),
            str(ready),
            str(saves),
            log_name,
        )
    )

    def versions() -> set[tuple[str, ...]]:
        seen = set()
        for m in manifests(remote):
            e = entry(m, "model.pt")
            if e is not None:
                seen.add(tuple(e["chunks"]))
        return seen

    wait_for(lambda: len(versions()) >= 3, what="3 versions of model.pt", proc=ckpt, timeout=45)
    assert not (ready / "appender-stopped").exists(), (
        "the snapshots came only after the appender stopped"
    )
    (ready / "stop").write_text("")
    assert ckpt.wait() == 0, ckpt.stderr()
    final = (ckpt_dir / log_name).read_bytes()
    out = tmp_path / "restored"
    restore_into(remote, out, cwd=tmp_path)
    assert (out / log_name).read_bytes() == final
    for m in manifests(remote):
        e = entry(m, log_name)
        assert e is None or e["size"] <= len(final)
        assert m.get("verified") is True, m.get("unverified")


#: Writes model.pt torn (half of a torch zip, closed), then commits: with
#: wait=True and wait=False; prints each outcome as a JSON line.
TORN_COMMIT = r"""
import io, json, os
from pathlib import Path
import torch
import ckpt

d = Path(os.environ["CKPT_DIR"])
buf = io.BytesIO()
torch.save({"w": torch.zeros(10_000)}, buf)
data = buf.getvalue()
(d / "notes.txt").write_text("whole")
(d / "model.pt").write_bytes(data[: len(data) // 2])
for wait in (True, False):
    try:
        print(json.dumps({"wait": wait, "ok": ckpt.commit(wait=wait)}), flush=True)
    except ckpt.CommitError as exc:
        print(json.dumps({"wait": wait, "error": str(exc)}), flush=True)
(d / "model.pt").write_bytes(data)
print(json.dumps({"whole": ckpt.commit()}), flush=True)
"""


@pytest.mark.parametrize("checks", ["on", "off"])
def test_a_commit_of_a_torn_file_fails_naming_it(
    tmp_path: Path, ckpt_dir: Path, remote: Path, checks: str
) -> None:
    """An explicit commit stays exact but is checked: a torn model.pt makes
    ckpt.commit() raise CommitError naming the file and the check, for a
    commit that waits and one that does not; nothing is snapshotted for it.
    With --no-format-checks the same commit is taken as it is."""
    pytest.importorskip("torch")
    script = tmp_path / "torn_commit.py"
    script.write_text(TORN_COMMIT)
    extra = ["--no-format-checks"] if checks == "off" else []
    res = run_ckpt(
        ["run", "--dir", str(ckpt_dir), "--remote", str(remote), *extra, "--", PY, str(script)],
        cwd=tmp_path,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(lines) == 3, res.stdout
    if checks == "on":
        for outcome in lines[:2]:
            assert "error" in outcome, outcome
            assert outcome["error"].startswith("model.pt fails the zip check"), outcome
            assert "--no-format-checks" in outcome["error"]
        assert lines[2]["whole"]
        assert next(m for m in manifests(remote) if m.get("reason") == "commit")["verified"]
        for m in manifests(remote):
            e = entry(m, "model.pt")
            assert e is None or e["size"] == (ckpt_dir / "model.pt").stat().st_size
    else:
        assert lines[0]["ok"] and lines[1]["ok"] is None, lines
        assert all("verified" not in m for m in manifests(remote))


#: Writes model.pt in place and stops half-way with the file open, for good.
HOLD_OPEN = r"""
import os, sys, time
from pathlib import Path
d, ready = Path(os.environ["CKPT_DIR"]), Path(sys.argv[1])
(d / "notes.txt").write_text("whole")
f = open(d / "model.pt", "wb")
f.write(b"PK\x03\x04" + b"\0" * 5000)
f.flush()
(ready / "paused").write_text(str(os.getpid()))
time.sleep(600)
"""


def test_after_the_settle_timeout_the_snapshot_is_taken_unverified(
    spawn: Callable[..., Running], tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    """A file held open for writing for good: `ckpt status` says what the
    snapshot waits for (file, pid), and after --settle-timeout it is taken
    anyway, verified=False, unverified naming the file and why, with a
    warning naming the file and the pid."""
    ready = tmp_path / "ready"
    ready.mkdir()
    script = tmp_path / "hold.py"
    script.write_text(HOLD_OPEN)
    log = tmp_path / "events.jsonl"
    ckpt = spawn(
        _args(
            ckpt_dir,
            remote,
            "--debounce",
            "0.3",
            "--settle-timeout",
            "10",
            "--log-json",
            str(log),
            "--",
            PY,
            str(script),
            str(ready),
        )
    )
    wait_for((ready / "paused").exists, what="the writer's pause", proc=ckpt)
    child = int((ready / "paused").read_text())
    ckpt.extra_pids.append(child)

    def waiting() -> list[dict[str, Any]]:
        res = run_ckpt(["status", "--json"], cwd=tmp_path, timeout=30)
        runs = json.loads(res.stdout)["runs"] if res.returncode == 0 else []
        return [w for r in runs for w in (r.get("waiting_for") or [])]

    got = wait_for(waiting, what="ckpt status to say what the snapshot waits for", proc=ckpt)
    assert got == [{"path": "model.pt", "reason": f"open for writing by pid {child} (python)"}]
    text = subprocess.run(
        [str(CKPT), "status"], check=False, capture_output=True, text=True, cwd=tmp_path
    ).stdout
    assert "snapshot waits for: model.pt (open for writing by pid" in text, text

    m = wait_for(
        lambda: next((m for m in manifests(remote) if m.get("verified") is False), None),
        what="the snapshot taken after the settle timeout",
        proc=ckpt,
    )
    assert m["unverified"] == [
        {"path": "model.pt", "reason": f"open for writing by pid {child} (python)"}
    ]
    assert entry(m, "notes.txt") is not None
    warned = wait_for(
        lambda: [ln for ln in ckpt.stderr().splitlines() if "is taken anyway" in ln],
        what="the warning",
        proc=ckpt,
    )
    assert warned[0].startswith("ckpt: warning: snapshot waited "), warned
    assert "(--settle-timeout)" in warned[0]
    assert f"unverified: model.pt (open for writing by pid {child} (python))" in warned[0]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(e["event"] == "snapshot_waiting" and e["state"] == "waiting" for e in events)
    ckpt.signal(signal.SIGTERM)
    ckpt.wait()
    assert newest_manifest(remote)["verified"] is False


def test_the_final_snapshot_of_a_torn_file_is_unverified(
    tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    """The job is over and left model.pt torn (closed): the final flush does
    not wait for it (nothing can change it now) but records the snapshot as
    unverified, naming the file and the failed check."""
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1000)}, buf)
    torn = buf.getvalue()[:3000]
    script = tmp_path / "torn.py"
    script.write_text(
        "import os, sys\n"
        "path = os.path.join(os.environ['CKPT_DIR'], 'model.pt')\n"
        "open(path, 'wb').write(bytes.fromhex(sys.argv[1]))\n"
    )
    res = run_ckpt(
        _args(ckpt_dir, remote, "--debounce", "30", "--", PY, str(script), torn.hex()),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    m = newest_manifest(remote)
    assert m["verified"] is False
    assert m["unverified"][0]["path"] == "model.pt"
    assert m["unverified"][0]["reason"].startswith("fails the zip check: ")
    assert "is unverified: model.pt (fails the zip check: " in res.stderr, res.stderr


#: Writes model.pt torn, then runs `ckpt commit` from the shell (as a bash
#: script would) and prints its exit status and stderr as one JSON line.
TORN_SHELL_COMMIT = r"""
import io, json, os, subprocess
from pathlib import Path
import torch

d = Path(os.environ["CKPT_DIR"])
buf = io.BytesIO()
torch.save({"w": torch.zeros(10_000)}, buf)
(d / "model.pt").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
res = subprocess.run([os.environ["CKPT_BIN"], "commit"], capture_output=True, text=True)
print(json.dumps({"status": res.returncode, "stderr": res.stderr}), flush=True)
"""


def test_ckpt_commit_of_a_torn_file_is_a_data_error_not_retry_later(
    tmp_path: Path, ckpt_dir: Path, remote: Path
) -> None:
    """`ckpt commit` from a shell script over a torn model.pt: one error line
    naming the file and the check, exit 65 (the same commit fails again), not
    69 (remote unavailable, retry later: a script that retries on 69 would
    loop)."""
    pytest.importorskip("torch")
    script = tmp_path / "torn_shell_commit.py"
    script.write_text(TORN_SHELL_COMMIT)
    res = run_ckpt(
        ["run", "--dir", str(ckpt_dir), "--remote", str(remote), "--", PY, str(script)],
        cwd=tmp_path,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    (outcome,) = [json.loads(line) for line in res.stdout.splitlines()]
    assert outcome["status"] == ExitCode.DAMAGED, outcome
    (line,) = [x for x in outcome["stderr"].splitlines() if x.startswith("ckpt: error:")]
    assert "model.pt fails the zip check" in line, line
