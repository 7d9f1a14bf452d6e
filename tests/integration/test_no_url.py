"""The commands that take a remote find it as `ckpt run` does when none is
named: flag (or argument) > CKPT_REMOTE > ckpt.toml / [tool.ckpt] > the
embedded store of --dir. Through the real binary, with the isolated HOME of
conftest (the embedded store lives under the test's XDG_DATA_HOME): the
README's quickstart and the commands a newcomer types next, the order of the
sources, the one error when nothing names a remote, the old shapes of the
commands, and the line that says which remote was used."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckpt._contract import ExitCode

from ._util import CKPT, ckpt_ok, error_lines, manifest_paths, read_tree, run_ckpt

pytestmark = pytest.mark.timeout(240)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PY = sys.executable


def _store_of(tmp_path: Path) -> Path:
    """Where the embedded store of tmp_path/checkpoints is (conftest's HOME)."""
    return _store_of_dir(tmp_path / "checkpoints")


def _store_of_dir(directory: Path) -> Path:
    """Where the embedded store of --dir `directory` is (conftest's HOME)."""
    from ckpt_cli.config import default_remote

    return Path(default_remote(Path(os.path.realpath(directory))))


def _json(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    res = run_ckpt([*args, "--json"], cwd=cwd, env=env)
    assert res.returncode == 0, f"{args}: exit {res.returncode}\n{res.stderr}"
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def _push(src: Path, remote: Path, cwd: Path, text: str) -> None:
    src.mkdir(exist_ok=True)
    (src / "state.txt").write_text(text)
    ckpt_ok(["push", str(src), str(remote), "--keep", "10"], cwd=cwd)


def test_the_quickstart_then_ls_verify_and_restore_need_no_url(tmp_path: Path) -> None:
    """The README's first command on examples/counter, then what a newcomer
    types next: `ckpt ls`, `ckpt verify`, and `ckpt restore` of a lost
    checkpoint directory, none of them naming a remote."""
    shutil.copytree(EXAMPLES / "counter", tmp_path / "examples" / "counter")
    first = run_ckpt(
        ["run", "--", PY, "examples/counter/train.py"],
        cwd=tmp_path,
        env={"COUNTER_DELAY": "0", "CKPT_BACKOFF": "0"},
    )
    assert first.returncode == 0, first.stderr
    assert "done: 10 steps, total 55" in first.stdout
    store = _store_of(tmp_path)
    assert f"remote: {store} (embedded local store" in first.stderr

    ls = run_ckpt(["ls"], cwd=tmp_path)
    assert ls.returncode == 0, ls.stderr
    rows = [line.split() for line in ls.stdout.splitlines()[1:]]
    # The snapshot of what attempt 1 left is taken while the retry runs
    # (CKPT_BACKOFF=0): on a busy machine it may hold attempt 2's end too.
    assert len(rows) in (1, 2) and rows[0][-1] == "newest", ls.stdout
    doc = _json(["ls"], tmp_path)
    assert doc["remote"] == str(store)
    gens = [s["generation"] for s in doc["snapshots"]]
    assert gens == list(range(len(rows), 0, -1)), gens

    verify = run_ckpt(["verify", "--full"], cwd=tmp_path)
    assert verify.returncode == 0, verify.stderr
    n = "1 snapshot" if len(rows) == 1 else "2 snapshots"
    assert f"verified {n}" in verify.stderr and "all complete" in verify.stderr

    before = read_tree(tmp_path / "checkpoints")
    refused = run_ckpt(["restore"], cwd=tmp_path)  # the usual refusal: not empty, no --force
    assert refused.returncode == ExitCode.CONFIG, refused.stderr
    assert "--force" in error_lines(refused.stderr)[0]
    shutil.rmtree(tmp_path / "checkpoints")
    restored = run_ckpt(["restore"], cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert read_tree(tmp_path / "checkpoints") == before
    assert json.loads(before["state.json"]) == {"step": 10, "total": 55}


def test_flag_beats_env_beats_file_beats_the_embedded_store(tmp_path: Path) -> None:
    """Four remotes, each holding its own snapshot; taking the sources away
    one by one, the listing follows the precedence of `ckpt run`."""
    work = tmp_path / "work"
    work.mkdir()
    remotes = {name: tmp_path / name for name in ("flag", "env", "file")}
    for name, remote in remotes.items():
        _push(tmp_path / f"src-{name}", remote, tmp_path, name)
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / "state.txt").write_text("embedded")
    ckpt_ok(["push"], cwd=work)  # --dir ./checkpoints into its embedded store
    (work / "ckpt.toml").write_text(f"remote = {json.dumps(str(remotes['file']))}\n")
    env = {"CKPT_REMOTE": str(remotes["env"])}

    def listed(args: list[str], env: dict[str, str] | None) -> str:
        doc = _json(["ls", *args], work, env)
        return str(doc["remote"])

    assert listed(["--remote", str(remotes["flag"])], env) == str(remotes["flag"])
    assert listed([str(remotes["flag"])], env) == str(remotes["flag"]), "the argument"
    assert listed([], env) == str(remotes["env"])
    assert listed([], None) == str(remotes["file"])
    (work / "ckpt.toml").unlink()
    (work / "pyproject.toml").write_text(
        f"[tool.ckpt]\nremote = {json.dumps(str(remotes['file']))}\n"
    )
    assert listed([], None) == str(remotes["file"])
    (work / "pyproject.toml").unlink()
    assert listed([], None) == str(_store_of(work))
    restored = tmp_path / "restored"
    ckpt_ok(["restore", "--remote", str(remotes["env"]), "--dir", str(restored)], cwd=work)
    assert read_tree(restored) == {"state.txt": b"env"}

    # --verbose says which one and why; stdout stays one JSON document.
    res = run_ckpt(["ls", "--json", "-v"], cwd=work, env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["remote"] == str(remotes["env"])
    assert f"remote: {remotes['env']} (from env CKPT_REMOTE)" in res.stderr


def test_nothing_names_a_remote_is_one_error_naming_the_three_ways(tmp_path: Path) -> None:
    """No flag, no env var, no file, and no embedded store for this --dir: no
    command guesses one; the error says how to name it, and nothing is made."""
    data = Path(os.environ["XDG_DATA_HOME"])
    for args in (["ls"], ["show"], ["diff", "1", "2"], ["verify"], ["gc", "--keep", "1"]):
        for extra in ([], ["--dir", str(tmp_path / "ck")]):
            res = run_ckpt([*args, *extra], cwd=tmp_path)
            assert res.returncode == ExitCode.CONFIG, f"{args + extra}: {res.stderr}"
            (line,) = error_lines(res.stderr)
            for way in ("--remote", "CKPT_REMOTE", "ckpt.toml"):
                assert way in line, line
            assert res.stdout == ""
    res = run_ckpt(["restore"], cwd=tmp_path)
    assert res.returncode == ExitCode.CONFIG, res.stderr
    assert not (tmp_path / "checkpoints").exists()
    assert not (data / "ckpt").exists(), "a reader never creates the embedded store"


def test_the_old_shapes_still_work_and_mixing_them_is_a_usage_error(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    src = tmp_path / "src"
    _push(src, remote, tmp_path, "one")  # ckpt push DIR REMOTE
    ckpt_ok(["restore", str(remote), str(tmp_path / "out")], cwd=tmp_path)  # REMOTE DIR
    assert read_tree(tmp_path / "out") == {"state.txt": b"one"}
    (src / "state.txt").write_text("two")
    ckpt_ok(["push", str(src), "--remote", str(remote)], cwd=tmp_path)
    assert len(manifest_paths(remote)) == 2
    assert len(_json(["ls", str(remote)], tmp_path)["snapshots"]) == 2
    show = _json(["show", str(remote), "1"], tmp_path)
    assert show["snapshot"]["generation"] == 1
    diff = _json(["diff", str(remote), "1", "2"], tmp_path)
    assert [c["path"] for c in diff["changed"]] == ["state.txt"]

    env = {"CKPT_REMOTE": str(remote)}
    assert _json(["show", "1"], tmp_path, env)["snapshot"]["generation"] == 1
    assert _json(["show"], tmp_path, env)["snapshot"]["generation"] == 2
    assert [c["path"] for c in _json(["diff", "1", "2"], tmp_path, env)["changed"]] == ["state.txt"]
    (tmp_path / "12").mkdir()  # `ckpt show 12`: generation 12, or the path ./12?
    res = run_ckpt(["show", "12"], cwd=tmp_path, env=env)
    assert res.returncode == ExitCode.USAGE, res.stderr
    assert "--remote 12" in error_lines(res.stderr)[0]

    for args in (
        ["ls", str(remote), "--remote", str(remote)],
        ["restore", str(remote), str(tmp_path / "x"), "--dir", str(tmp_path / "y")],
        ["push", str(src), str(remote), "--remote", str(remote)],
        ["diff", str(remote), "1", "2", "--remote", str(remote)],
        ["diff", "1"],
    ):
        res = run_ckpt(args, cwd=tmp_path)
        assert res.returncode == ExitCode.USAGE, f"{args}: {res.stderr}"
        assert len(error_lines(res.stderr)) == 1, res.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_storage_options_come_from_the_same_sources(store_of: Any, tmp_path: Path) -> None:
    """An S3 remote and its storage options (endpoint, keys) in ckpt.toml
    alone: `ckpt ls` and `ckpt restore` need nothing on the command line."""
    store = store_of("s3-moto")
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"w" * 5000)
    pushed = run_ckpt(["push", str(src), store.url], cwd=tmp_path, env=store.env)
    assert pushed.returncode == 0, pushed.stderr
    work = tmp_path / "work"
    work.mkdir()
    (work / "ckpt.toml").write_text(
        f"remote = {json.dumps(store.url)}\n\n[storage_options]\n"
        + "".join(f"{k} = {_toml(v)}\n" for k, v in store.storage_options.items())
    )
    # No store.env now: the endpoint and the keys are in ckpt.toml alone.
    assert not any(k in os.environ for k in ("AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL_S3"))
    doc = _json(["ls"], work)
    assert doc["remote"] == store.url and len(doc["snapshots"]) == 1
    res = run_ckpt(["restore"], cwd=work)
    assert res.returncode == 0, res.stderr
    assert read_tree(work / "checkpoints") == {"weights.bin": b"w" * 5000}
    for secret in store.secrets:
        assert secret not in res.stdout + res.stderr


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)  # strings, numbers and booleans read back as TOML


def test_push_keeps_three_by_default_and_reads_keep_like_run(tmp_path: Path) -> None:
    """`ckpt push` prunes as `ckpt run` does: --keep 3 unless told otherwise,
    and told the same way (flag > CKPT_KEEP > ckpt.toml)."""
    src, remote = tmp_path / "src", tmp_path / "remote"
    src.mkdir()
    for i in range(5):
        (src / "state.txt").write_text(f"push {i}")
        ckpt_ok(["push", str(src), str(remote)], cwd=tmp_path)
    assert len(manifest_paths(remote)) == 3, "five pushes leave three snapshots"
    (tmp_path / "ckpt.toml").write_text("keep = 4\n")
    for i in range(2):
        (src / "state.txt").write_text(f"more {i}")
        ckpt_ok(["push", str(src), str(remote)], cwd=tmp_path)
    assert len(manifest_paths(remote)) == 4
    (src / "state.txt").write_text("last")
    res = run_ckpt(["push", str(src), str(remote)], cwd=tmp_path, env={"CKPT_KEEP": "1"})
    assert res.returncode == 0, res.stderr
    assert len(manifest_paths(remote)) == 1


def test_on_a_terminal_the_remote_used_is_said(tmp_path: Path) -> None:
    """On a terminal (stderr a pty), a remote nobody named on the command
    line is said in one line; off one, nothing is added (scripts parse
    stderr less than people read it)."""
    remote = tmp_path / "remote"
    _push(tmp_path / "src", remote, tmp_path, "one")
    env = {**os.environ, "CKPT_REMOTE": str(remote), "TERM": "xterm", "NO_COLOR": "1"}
    primary, secondary = os.openpty()
    try:
        proc = subprocess.run(
            [str(CKPT), "ls", "--json"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=secondary,
            timeout=60,
            check=False,
        )
        os.close(secondary)
        said = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the pty's other end is closed and drained
                break
            if not chunk:
                break
            said += chunk
    finally:
        os.close(primary)
    assert proc.returncode == 0, said
    assert json.loads(proc.stdout)["remote"] == str(remote), "stdout is the JSON alone"
    assert f"remote: {remote} (from env CKPT_REMOTE)" in said.decode(errors="replace")
    off = run_ckpt(["ls", "--json"], cwd=tmp_path, env={"CKPT_REMOTE": str(remote)})
    assert off.returncode == 0 and "remote:" not in off.stderr, off.stderr


def test_a_dir_whose_name_is_not_utf8_gets_an_embedded_store_too(tmp_path: Path) -> None:
    """A --dir named with a byte that is not UTF-8 (b'ck\\xffpt': Linux takes
    any bytes but / and NUL) and no remote: push, ls (table and --json), run
    and restore all use its embedded store, as for any other name. (They
    crashed with exit 70, "UnicodeEncodeError: ... surrogates not allowed",
    hashing the path for the store's name; with a remote named it worked.)"""
    name = os.fsdecode(b"ck\xffpt")
    ck = tmp_path / name
    ck.mkdir()
    (ck / "f").write_text("x\n")
    for args in (["push", "--dir", name], ["ls", "--dir", name]):
        res = run_ckpt(args, cwd=tmp_path)
        assert res.returncode == 0, f"{args}: exit {res.returncode}\n{res.stderr}"
        assert "unexpected error" not in res.stderr, res.stderr
    doc = _json(["ls", "--dir", name], tmp_path)
    assert [s["generation"] for s in doc["snapshots"]] == [1]
    assert Path(doc["remote"]) == _store_of_dir(ck)

    save = "import os, pathlib; pathlib.Path(os.environ['CKPT_DIR'], 'g').write_text('y')"
    run = run_ckpt(["run", "--dir", name, "--backoff", "0", "--", PY, "-c", save], cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "final state is durable" in run.stderr, run.stderr

    shutil.rmtree(ck)
    restored = run_ckpt(["restore", "--dir", name], cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert read_tree(ck) == {"f": b"x\n", "g": b"y"}


def test_push_leaves_out_what_run_excludes(tmp_path: Path) -> None:
    """`exclude` in ckpt.toml (and --exclude, which takes its place, as for
    run): `ckpt push` leaves those names out as `ckpt run` does. Push took
    every file, the logs a run leaves out included."""
    src = tmp_path / "checkpoints"
    (src / "logs").mkdir(parents=True)
    (src / "model.bin").write_bytes(b"weights")
    (src / "logs" / "events.log").write_bytes(b"a log")
    (src / "scratch.dat").write_bytes(b"partial")
    (tmp_path / "ckpt.toml").write_text('exclude = ["logs"]\n')

    def pushed(remote: str, *extra: str) -> list[str]:
        ckpt_ok(["push", str(src), str(tmp_path / remote), *extra], cwd=tmp_path)
        doc = _json(["show", str(tmp_path / remote)], tmp_path)
        return sorted(e["path"] for e in doc["entries"])

    assert pushed("from-file") == ["model.bin", "scratch.dat"]
    assert pushed("from-flag", "--exclude", "*.dat") == ["logs", "logs/events.log", "model.bin"]
