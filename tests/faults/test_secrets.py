"""Isolation through the real binary: secrets are never printed or written
where others read them, and text from outside (file names, manifests, run
records, control-socket replies) never reaches the terminal raw.

- A URL password (sftp://user:PASSWORD@host) in every command's text and
  --json output; numbers and Authorization headers among the storage
  options (flags and CKPT_STORAGE_OPTIONS) in --print-config; every form of
  `-o` in a crash log, which is private (0600 in a 0700 directory).
- The --log-json file: scrubbed, created 0600, a symlink or another user's
  file refused.
- `ckpt status` and a registry directory of another user (or open to
  everyone) holding an entry that points at a socket which replies with
  terminal escapes; `ckpt status --socket` of such a socket.
- `ckpt show`, `diff`, `ls`, `ls --runs` of a repository whose file names and
  run records carry terminal escapes, line breaks and rich markup.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration._util import PY, error_lines
from stores import Store

from ._io import ckpt, one_error
from ._tally import record

pytestmark = pytest.mark.timeout(240)

CONFIG, SOFTWARE = 78, 70
#: What terminals act on: ESC (CSI, OSC: colours, cursor, title), BEL, C1 CSI.
RAW = ("\x1b", "\x07", "\x9b")


def _no_raw(*texts: str) -> None:
    for text in texts:
        for ch in RAW:
            assert ch not in text, f"a raw {ch!r} was printed:\n{text!r}"


# ---------------------------------------------------------------- secrets


def test_a_url_password_is_printed_by_no_command(store_of: Any, tmp_path: Path) -> None:
    """Injected: an SFTP remote named with user:PASSWORD@ (the server takes
    the key; the password rides along). Asserted: push, ls, show, verify and
    gc, as text and as --json, never print it (the --json documents used to
    carry the URL as given)."""
    store: Store = store_of("sftp")
    password = "Pw-0f-the-URL-4242"
    scheme, rest = store.url.split("://", 1)
    url = f"{scheme}://{os.environ.get('USER') or 'root'}:{password}@{rest}"
    user = store.env.get("FSSPEC_SFTP_USERNAME")
    if user:
        url = f"{scheme}://{user}:{password}@{rest}"
    src = tmp_path / "src"
    src.mkdir()
    (src / "state.txt").write_text("one")
    outputs: list[str] = []
    for i, args in enumerate(
        [
            ["push", str(src), url],
            ["ls", url],
            ["ls", url, "--json"],
            ["ls", url, "--runs", "--json"],
            ["show", url],
            ["show", url, "--json"],
            ["verify", url],
            ["verify", url, "--json"],
            ["gc", url, "--keep", "5", "--dry-run"],
            ["gc", url, "--keep", "5", "--dry-run", "--json"],
        ]
    ):
        res = ckpt(args, cwd=tmp_path, env=store.env)
        assert res.returncode == 0, f"{args}: {res.stderr}"
        outputs += [res.stdout, res.stderr]
        if i == 2:
            assert json.loads(res.stdout)["remote"].endswith(rest)
    for text in outputs:
        assert password not in text, text
    record("isolation: secrets and escapes", 10, what="URL password")


def test_print_config_masks_secrets_of_every_type(tmp_path: Path) -> None:
    """Injected: `-o password=987654321` (JSON makes it a number), `-o
    headers.Authorization=Bearer ...`, `-o api_key=...`, and the same in
    CKPT_STORAGE_OPTIONS. Asserted: --print-config prints none of them, and
    its output is still TOML (a masked number is a string "***")."""
    number, bearer, api = "987654321", "tok-bearer-5550123", "apikey-0042-9911"
    flags = ["-o", f"password={number}", "-o", f"headers.Authorization=Bearer {bearer}"]
    flags += ["-o", f"api_key={api}"]
    from_flags = ckpt(["run", "--print-config", *flags, "--", "true"], cwd=tmp_path)
    env_options = {"password": int(number), "headers": {"Authorization": f"Bearer {bearer}"}}
    from_env = ckpt(
        ["run", "--print-config", "--", "true"],
        cwd=tmp_path,
        env={"CKPT_STORAGE_OPTIONS": json.dumps({**env_options, "x-api-key": api})},
    )
    for res in (from_flags, from_env):
        assert res.returncode == 0, res.stderr
        for secret in (number, bearer, api):
            assert secret not in res.stdout + res.stderr, res.stdout
        doc = tomllib.loads(res.stdout)
        assert doc["storage-options"]["password"] == "***", doc
    record("isolation: secrets and escapes", 6, what="--print-config")


def test_print_config_escapes_what_a_config_file_carries(tmp_path: Path) -> None:
    """Injected: a ckpt.toml (a file of the project, maybe someone else's) whose
    values carry an escape, a C1 CSI (\\u009b), a bidi override and a BEL.
    Asserted: --print-config prints none of them raw (JSON-style escaping
    left the C1 controls raw), and its output loads back to the same
    values."""
    remote, exclude = "s3://b/x\x1b[2J\u009b31m\u202e\x07", "*.tmp\u009b"
    (tmp_path / "ckpt.toml").write_text(
        f"remote = {json.dumps(remote)}\nexclude = [{json.dumps(exclude)}]\n"
    )
    res = ckpt(["run", "--print-config", "--", "true"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    _no_raw(res.stdout, res.stderr)
    assert "\u202e" not in res.stdout
    doc = tomllib.loads(res.stdout)
    assert doc["remote"] == remote and doc["exclude"] == [exclude], doc
    record("isolation: secrets and escapes", 1, what="--print-config of a ckpt.toml")


CRASH = """
import os

if os.environ.get("CKPT_TEST_CRASH"):
    import ckpt_cli.repo_tools

    def crash(*args, **kwargs):
        raise RuntimeError("injected: a bug in ckpt")

    ckpt_cli.repo_tools.open_existing = crash
"""


def test_a_crash_log_is_private_and_hides_every_form_of_storage_option(tmp_path: Path) -> None:
    """Injected: a bug (a sitecustomize module on PYTHONPATH replaces a
    function of ckpt's with one that raises) in `ckpt restore` given
    storage options in every form click takes: `-oKEY=V`, `-qoKEY=V`,
    `-o KEY=V`, `--storage-option=KEY=V`, `--storage-option KEY=V`; the
    state directory exists as an older ckpt left it (0755). Asserted: exit
    70 naming the crash log; no value is in the log or on stderr (the
    attached `-oKEY=V` used to be written as given); the log is 0600 in a
    0700 directory (it was 0644 in 0755)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH)
    state = Path(os.environ["XDG_STATE_HOME"]) / "ckpt"
    state.mkdir(parents=True)
    state.chmod(0o755)
    secrets = ["attached-5ecret-1", "cluster-5ecret-2", "spaced-5ecret-3", "long-5ecret-4"]
    secrets.append("long-5ecret-5")
    args = ["restore", str(tmp_path / "remote"), str(tmp_path / "out")]
    args += [f"-osecret={secrets[0]}", f"-qoaccount_key={secrets[1]}", "-o", f"key={secrets[2]}"]
    args += [f"--storage-option=token={secrets[3]}", "--storage-option", f"sas={secrets[4]}"]
    res = ckpt(args, cwd=tmp_path, env={"PYTHONPATH": str(hook), "CKPT_TEST_CRASH": "1"})
    assert res.returncode == SOFTWARE, res.stderr
    assert "injected: a bug in ckpt" in res.stderr, res.stderr
    (log,) = state.glob("crash-*.log")
    text = log.read_text()
    assert "injected: a bug in ckpt" in text and "argv: " in text
    for secret in secrets:
        assert secret not in text, text
        assert secret not in res.stderr, res.stderr
    assert "-osecret=***" in text and "-qoaccount_key=***" in text, text
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    record("isolation: secrets and escapes", 5, what="crash log")


def test_log_json_is_scrubbed_private_and_never_through_a_symlink(tmp_path: Path) -> None:
    """Injected: a credential env var whose value the child's command line
    also carries, with --log-json; then --log-json at a symlink to a file
    the run may write, and (as root) at a file of another user. Asserted: the
    log is 0600 and holds no secret (the `start` event's command used to);
    the symlink and the foreign file are refused with one line (78) before
    the child starts, and the link's target is untouched."""
    secret = "env-5ecret-value-7788"
    log = tmp_path / "events.jsonl"
    remote, ck = str(tmp_path / "remote"), str(tmp_path / "ck")
    command = [PY, "-c", "1", secret]
    res = ckpt(
        ["run", "--dir", ck, "--remote", remote, "--log-json", str(log), "--", *command],
        cwd=tmp_path,
        env={"AWS_SECRET_ACCESS_KEY": secret},
    )
    assert res.returncode == 0, res.stderr
    assert secret not in res.stderr
    text = log.read_text()
    assert '"event":"start"' in text and secret not in text, text
    assert stat.S_IMODE(log.stat().st_mode) == 0o600

    precious = tmp_path / "precious.txt"
    precious.write_text("not a log\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(precious)
    marker = tmp_path / "child-ran"
    mark = ["--", PY, "-c", "import pathlib, sys; pathlib.Path(sys.argv[1]).touch()", str(marker)]
    refused = [
        ckpt(["run", "--dir", ck, "--remote", remote, "--log-json", str(link), *mark], cwd=tmp_path)
    ]
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign.jsonl"
        foreign.write_text("")
        os.chown(foreign, 65534, 65534)
        args = ["run", "--dir", ck, "--remote", remote, "--log-json", str(foreign), *mark]
        refused.append(ckpt(args, cwd=tmp_path))
    for res in refused:
        assert res.returncode == CONFIG, res.stderr
        one_error(res, "--log-json")
    assert precious.read_text() == "not a log\n"
    assert not marker.exists()
    record("isolation: secrets and escapes", 1 + len(refused), what="--log-json")


# ---------------------------------------------------------------- ckpt status

EVIL = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x9b"


@contextlib.contextmanager
def _evil_socket(path: Path) -> Iterator[None]:
    """A control socket that answers every request with terminal escapes in
    every field `ckpt status` prints, and non-numbers where numbers go."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    reply = {
        "ok": True,
        "run": f"run{EVIL}",
        "dir": f"/d{EVIL}",
        "remote": f"s3://b{EVIL}",
        "attempt": EVIL,
        "child_pid": EVIL,
        "last_snapshot": f"snap{EVIL}",
        "last_snapshot_age": "soon",
        "snapshots": EVIL,
        "bytes_uploaded": "lots",
        "backlog_bytes": 1e400,
        "backlog_files": EVIL,
        "rate": "fast",
        "last_error": f"err{EVIL}\nckpt: error: forged line",
        "preemption": EVIL,
    }
    data = json.dumps(reply).replace("1e400", "Infinity").encode() + b"\n"

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield
    finally:
        server.close()


@pytest.mark.parametrize("foreign", ["another user's", "open to everyone"])
def test_status_reads_no_registry_but_a_private_one_of_its_own(
    tmp_path: Path, foreign: str
) -> None:
    """Injected: the registry `ckpt status` reads ($XDG_RUNTIME_DIR/ckpt)
    is 0777 and (as root) owned by another user; it holds an entry for a live
    pid whose socket replies with terminal escapes. Asserted: status reads
    nothing there: one warning naming the registry, "no ckpt run", exit 0,
    nothing of the planted reply printed (it used to print it, escapes
    raw)."""
    if foreign == "another user's" and os.geteuid() != 0:
        pytest.skip("only root can make a directory owned by another user")
    sock = tmp_path / "evil.sock"
    registry = Path(os.environ["XDG_RUNTIME_DIR"]) / "ckpt"
    registry.mkdir(parents=True)
    entry = {"pid": os.getpid(), "socket": str(sock), "run": "planted", "started": 1.0}
    (registry / f"{os.getpid()}.json").write_text(json.dumps(entry))
    registry.chmod(0o777)
    if foreign == "another user's":
        os.chown(registry, 65534, 65534)
    with _evil_socket(sock):
        res = ckpt(["status"], cwd=tmp_path)
        as_json = ckpt(["status", "--json"], cwd=tmp_path)
    assert res.returncode == 0 and as_json.returncode == 0, res.stderr + as_json.stderr
    _no_raw(res.stdout, res.stderr, as_json.stdout, as_json.stderr)
    assert "pwned" not in res.stdout + as_json.stdout, res.stdout
    assert json.loads(as_json.stdout) == {"runs": []}
    assert str(registry) in res.stderr and "warning" in res.stderr, res.stderr
    record("isolation: secrets and escapes", 1, what=f"registry {foreign}")


def test_status_of_a_socket_prints_its_reply_escaped(tmp_path: Path) -> None:
    """Injected: `ckpt status --socket` of a socket whose reply carries
    terminal escapes, a line break with a forged `ckpt: error:` line, and
    strings and Infinity where numbers go. Asserted: exit 0, no raw escape in
    text or --json, the escapes shown as `\\x1b`, the forged line stays
    inside its own line, the odd numbers shown as "?" (not a traceback)."""
    sock = tmp_path / "evil.sock"
    with _evil_socket(sock):
        res = ckpt(["status", "--socket", str(sock)], cwd=tmp_path)
        as_json = ckpt(["status", "--socket", str(sock), "--json"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert as_json.returncode == 0, as_json.stderr
    _no_raw(res.stdout, res.stderr, as_json.stdout, as_json.stderr)
    assert "\\x1b]0;pwned\\x07" in res.stdout, res.stdout
    assert not any(line.startswith("ckpt: error") for line in res.stdout.splitlines())
    assert "Traceback" not in res.stderr
    assert json.loads(as_json.stdout)["runs"][0]["run"] == f"run{EVIL}"
    record("isolation: secrets and escapes", 2, what="status reply")


# ---------------------------------------------------------------- names from a repository

#: Paths (a markup closing tag needs a `/`: a directory `a[` holding `x]`).
NAMES = {
    "evil\x1b]0;pwned\x07.bin": b"1",
    "clear\x1b[2J\x1b[H.bin": b"2",
    "a[/x]": b"3",
    "[bold red]loud[/bold red]": b"4",
    "line\nckpt: error: forged": b"5",
    "tab\tname": b"6",
    "rtl\u202etxt.exe": b"7",
}


def test_file_names_and_run_records_are_printed_escaped(tmp_path: Path) -> None:
    """Injected: files whose names carry terminal escapes, rich markup (a
    stray closing tag), a line break with a forged `ckpt: error:` line, a
    tab and a right-to-left override, pushed as two snapshots; a run record
    with escapes and markup in its host, exits and outcome. Asserted: show,
    diff, ls and ls --runs exit 0 with no raw escape, every name shown
    literally (escaped where it must be), no forged line (`ckpt show` used
    to print the escapes raw, and a markup-like name crashed it: exit 70,
    MarkupError)."""
    src = tmp_path / "src"
    src.mkdir()
    remote = tmp_path / "remote"
    for i in range(2):
        for name, data in NAMES.items():
            (src / name).parent.mkdir(exist_ok=True)
            (src / name).write_bytes(data * (i + 1))
        res = ckpt(["push", str(src), str(remote)], cwd=tmp_path)
        assert res.returncode == 0, res.stderr
    (remote / "runs").mkdir(exist_ok=True)
    planted: dict[str, Any] = {
        "format": "ckpt-run",
        "version": 1,
        "run": "20260101T000000-abcdef",
        "host": f"host{EVIL}[/x]",
        "pid": 1,
        "started": 1767225600.0,
        "ended": None,
        "attempts": [{"number": 1, "started": 1767225600.0, "seconds": 1, "exit": f"x{EVIL}"}],
        "preemption": None,
        "exit_status": None,
        "outcome": "[red]done[/blue]",
    }
    (remote / "runs" / f"{planted['run']}.json").write_text(json.dumps(planted))
    outputs = []
    for args in (["show"], ["show", "--json"], ["diff", "1", "2"], ["ls"], ["ls", "--runs"]):
        res = ckpt([args[0], str(remote), *args[1:]], cwd=tmp_path)
        assert res.returncode == 0, f"{args}: {res.stderr}"
        assert not error_lines(res.stderr), res.stderr
        _no_raw(res.stdout, res.stderr)
        outputs.append(res.stdout)
    show, _, diff, _, runs = outputs
    for text in (show, diff):
        assert "a[/x]" in text and "[bold red]loud[/bold red]" in text, text
        assert "evil\\x1b]0;pwned\\x07.bin" in text, text
        assert "line\\nckpt: error: forged" in text and "tab\\tname" in text, text
        assert "rtl\\u202etxt.exe" in text, text
        assert not any(line.startswith("ckpt: error") for line in text.splitlines())
    assert "[red]done[/blue]" in runs and "host\\x1b]0;pwned" in runs, runs
    record("isolation: secrets and escapes", len(NAMES) + 1, what="names from a repository")
