"""The control socket: newline-delimited JSON requests from the child or a shell.

    {"op": "status"}                         -> {"ok": true, ...live state...}
    {"op": "commit", "wait": true, "timeout": 60, "step": 1200}
                                             -> {"ok": true, "snapshot": ID, "step": 1200}
                                                once durable (step: optional, the
                                                global generation; see `world`)
                                             -> {"ok": false, "error": "..."}; when the
                                                remote refused it, the error says so and
                                                the commit is still uploaded later
    {"op": "commit", "wait": false}          -> {"ok": true, "pinned": true} once the
                                                directory's content is pinned and its
                                                changed files pass their format checks
                                             -> {"ok": false, "error": "model.pt fails
                                                the zip check: ...", "retryable": false}
                                                (either wait); retryable false: the
                                                same commit can never succeed
    {"op": "hello", "pid": P, "signal": "SIGUSR1"}
                                             -> {"ok": true}: pid P handles the
                                                checkpoint signal
    {"op": "signal"}                         -> {"ok": true, "pids": [P]}: the checkpoint
                                                signal was sent to the registered pids

One thread accepts; each connection is served on its own short-lived thread.
Every request gets one reply line, whatever it holds: a value of the wrong
type or out of range (`"timeout": "x"`, `1e400`, `"pid": 1.5`) is refused with
`config.check_number`, the one check of numbers of flags, env vars and files;
a line longer than MAX_LINE is refused without being read whole (and the
connection closed); an error of ckpt's own is a reply and one warning, never
a traceback on the run's stderr.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli import console
from ckpt_cli import processes as subtree
from ckpt_cli.config import MAX_SECONDS, check_number
from ckpt_cli.errors import CkptError, ConfigError
from ckpt_cli.progress import NotWholeError
from ckpt_cli.snapshotter import UnreadableError
from ckpt_cli.worker import SnapshotWorker

MAX_LINE = 64 * 1024
#: The largest pid Linux hands out (PID_MAX_LIMIT, 2**22).
MAX_PID = 1 << 22


class ControlServer:
    def __init__(
        self,
        path: Path,
        worker: SnapshotWorker,
        status: Callable[[], dict[str, Any]],
        hello: Callable[[int, str], None],
        send_signal: Callable[[], list[int]],
    ) -> None:
        self.path = path
        self.worker = worker
        self.status = status
        self.hello = hello
        self.send_signal = send_signal  # returns the pids signalled; raises CkptError
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o600)
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._accept, name="ckpt-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            while True:
                try:
                    raw = stream.readline(MAX_LINE + 1)  # never more than the limit
                except OSError:
                    return
                if not raw:
                    return
                too_long = len(raw) > MAX_LINE
                if too_long:
                    reply: dict[str, Any] = {
                        "ok": False,
                        "error": f"request too long (more than {MAX_LINE} bytes)",
                    }
                else:
                    reply = self.handle(raw)
                try:
                    stream.write(json.dumps(reply).encode() + b"\n")
                    stream.flush()
                except OSError:
                    return
                if too_long:
                    return  # the rest of that line is no request: hang up

    def handle(self, raw: bytes) -> dict[str, Any]:
        """The reply to one request line; never raises."""
        try:
            return self._handle(raw)
        except ConfigError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug of ckpt's: the client still gets its answer
            console.warn(f"control socket: {type(exc).__name__}: {exc}")
            return {"ok": False, "error": f"ckpt failed on this request: {type(exc).__name__}"}

    def _handle(self, raw: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(raw)
            op = msg["op"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return {"ok": False, "error": "expected a JSON object with an 'op'"}
        if not isinstance(msg, dict):
            return {"ok": False, "error": "expected a JSON object with an 'op'"}
        if op == "status":
            return {"ok": True, **self.status()}
        if op == "commit":
            step = msg.get("step")
            if step is not None and (
                not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 1 << 62
            ):
                return {
                    "ok": False,
                    "error": f"step must be a whole number from 0 to {(1 << 62) - 1}, not {step!r}",
                }
            wait = msg.get("wait", True)
            if not isinstance(wait, bool):
                return {"ok": False, "error": f"wait must be true or false, not {wait!r}"}
            timeout = msg.get("timeout")
            if timeout is not None:  # null: as long as it takes
                timeout = check_number(timeout, f"timeout {timeout!r}", min=0, max=MAX_SECONDS)
            try:
                req = self.worker.commit(step)
            except (NotWholeError, UnreadableError) as exc:  # the data: said at once
                return {"ok": False, "error": str(exc), "retryable": False}
            except OSError as exc:
                return {"ok": False, "error": f"pinning the directory failed: {exc}"}
            if not wait:
                return {"ok": True, "pinned": True}
            if not req.wait(timeout):
                return {"ok": False, "error": f"commit not durable within {timeout:g}s"}
            if req.error:
                return {"ok": False, "error": req.error, "retryable": req.retryable}
            return {
                "ok": True,
                "snapshot": req.manifest.id if req.manifest else None,
                "step": req.manifest.step if req.manifest else None,
            }
        if op == "hello":
            if "pid" not in msg:
                return {"ok": False, "error": "hello needs an integer 'pid'"}
            pid = msg["pid"]
            check_number(pid, f"pid {pid!r}", integer=True, min=1, max=MAX_PID)
            signame = msg.get("signal", "")
            if not isinstance(signame, str) or len(signame) > 32:
                return {"ok": False, "error": "signal must be a signal name (e.g. SIGUSR1)"}
            self.hello(int(pid), signame)
            return {"ok": True}
        if op == "signal":
            try:
                return {"ok": True, "pids": self.send_signal()}
            except CkptError as exc:
                return {"ok": False, "error": str(exc)}
        return {"ok": False, "error": f"unknown op {op!r}"}


# ---------------------------------------------------------------- the registry
#
# How `ckpt status` in another shell finds the running supervisors: each
# `ckpt run` writes <registry>/<pid>.json ({"pid", "socket", "dir", "remote",
# "run", "started"}) and removes it when it ends; an entry whose pid is gone (a
# killed run) is skipped and removed by whoever reads it. The registry is
# $XDG_RUNTIME_DIR/ckpt, else /tmp/ckpt-<uid>, private to the user (0700).


def registry_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "ckpt" if runtime else Path(f"/tmp/ckpt-{os.getuid()}")


def register(info: dict[str, Any]) -> Path | None:
    """Announce this run; the entry's path, or None if it cannot be written
    (`ckpt status` then needs --socket)."""
    where = registry_dir()
    try:
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        if untrusted_registry() is not None:
            return None  # someone else's, or open to others: not ours to trust
        entry = where / f"{os.getpid()}.json"
        tmp = entry.with_suffix(".tmp")
        tmp.write_text(json.dumps({**info, "pid": os.getpid()}))
        os.replace(tmp, entry)
        return entry
    except OSError:
        return None


def untrusted_registry() -> str | None:
    """Why the registry dir must not be read (not this user's, or open to
    others), or None: it is private, or does not exist."""
    where = registry_dir()
    try:
        st = where.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return f"the registry {where} is not a directory"
    if st.st_uid != os.getuid():
        return f"the registry {where} belongs to uid {st.st_uid}, not to you"
    if st.st_mode & 0o077:
        return f"the registry {where} is open to others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def registered() -> list[dict[str, Any]]:
    """The live entries, oldest first; stale ones (dead pid) are removed.
    Nothing from a registry that is not private to this user."""
    found = []
    where = registry_dir()
    if untrusted_registry() is not None:
        return []
    try:
        paths = sorted(where.glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            info = json.loads(path.read_text())
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError):
            continue
        if not subtree.pid_alive(pid) or not Path(str(info.get("socket", ""))).exists():
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        found.append(info)
    return sorted(found, key=_started)


def _started(info: dict[str, Any]) -> float:
    value = info.get("started")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return float(value)


def pick_run(entries: list[dict[str, Any]], directory: Path | None) -> dict[str, Any]:
    """Which running supervisor a command from another shell means (`ckpt
    signal`): the one of `directory` when given, else the only one running.
    CkptError (69) when none is running, or none for that directory;
    ConfigError (78) when several run and no directory says which."""
    where = registry_dir()
    dirs = ", ".join(str(e.get("dir")) for e in entries)
    if directory is not None:
        mine = [e for e in entries if str(e.get("dir")) == str(directory)]
        if mine:
            return mine[-1]  # the newest, should a stale entry of the same dir remain
        running = f" (running: {dirs})" if entries else f" (registry {where})"
        raise CkptError(
            f"no ckpt run of this user on this machine protects --dir {directory}{running}",
            exit_code=ExitCode.UNAVAILABLE,
        )
    if len(entries) == 1:
        return entries[0]
    if not entries:
        raise CkptError(
            f"no ckpt run is running for this user on this machine (registry {where}); "
            "inside a supervised child CKPT_SOCKET names its own, --socket another",
            exit_code=ExitCode.UNAVAILABLE,
        )
    raise ConfigError(f"{len(entries)} ckpt runs are running ({dirs}): say which with --dir")
