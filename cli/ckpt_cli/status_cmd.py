"""`ckpt status`: the live state of running supervisors, from another shell.

Without --socket it asks every `ckpt run` of this user on this machine (the
registry in `control`); with --socket (or CKPT_SOCKET, as inside the child)
only that one. Imports: standard library, `console`, `control`, `errors`.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from ckpt._contract import ExitCode
from ckpt_cli import console, control
from ckpt_cli.errors import RemoteError


def _ask(path: str, timeout: float = 5.0) -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(b'{"op": "status"}\n')
            data = b""
            while not data.endswith(b"\n"):
                part = sock.recv(65536)
                if not part:
                    break
                data += part
    except OSError as exc:
        raise RemoteError(
            f"no ckpt run answers on {path} ({exc.strerror or exc}); is it still running?"
        ) from None
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise RemoteError(f"{path} answered something that is not ckpt's status") from None
    return reply


def status(socket_path: str | None, as_json: bool) -> int:
    if socket_path:
        sockets = [socket_path]
    else:
        sockets = [str(info["socket"]) for info in control.registered()]
        if not sockets:
            if as_json:
                print(json.dumps({"runs": []}))
            else:
                console.info(
                    "no ckpt run is running for this user on this machine "
                    f"(registry {control.registry_dir()}; give --socket for another one)"
                )
            return ExitCode.OK
    states = []
    for path in sockets:
        state = _ask(path)
        state["socket"] = path
        states.append(state)
    if as_json:
        print(json.dumps({"runs": states}, indent=1))
        return ExitCode.OK
    for st in states:
        _print(st)
    return ExitCode.OK


def _print(st: dict[str, Any]) -> None:
    """Plain lines on stdout: the command's output (one block per run)."""
    age = st.get("last_snapshot_age")
    saved = (
        f"{st['last_snapshot']}, {console.fmt_age(age)} ago"
        if st.get("last_snapshot") and age is not None
        else "none yet"
    )
    child = st.get("child_pid")
    lines = [
        f"run {st.get('run')}: {st.get('dir')} -> {st.get('remote')}",
        f"  child: {'pid ' + str(child) if child else 'not running'}, attempt {st.get('attempt')}",
        f"  newest durable snapshot: {saved}",
        f"  upload backlog: {console.fmt_bytes(st.get('backlog_bytes') or 0)} in "
        f"{st.get('backlog_files') or 0} file(s); "
        f"{console.fmt_bytes(st.get('rate') or 0)}/s",
        f"  snapshots: {st.get('snapshots')}, "
        f"{console.fmt_bytes(st.get('bytes_uploaded') or 0)} uploaded",
    ]
    if st.get("last_error"):
        lines.append(f"  last error: {st['last_error']}")
    if st.get("preemption"):
        lines.append(f"  preemption notice: {st['preemption']}")
    print("\n".join(lines))
