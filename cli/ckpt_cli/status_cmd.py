"""`ckpt status`: the live state of running supervisors, from another shell.

Without --socket it asks every `ckpt run` of this user on this machine (the
registry in `control`); with --socket (or CKPT_SOCKET, as inside the child)
only that one. Imports: standard library, the shim's `_control` client,
`console`, `control`, `errors`.
"""

from __future__ import annotations

import json
from typing import Any

from ckpt._contract import ExitCode
from ckpt._control import CommitError, request
from ckpt_cli import console, control
from ckpt_cli.errors import RemoteError


def _ask(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """The shim's control-socket client, with ckpt's error (69, one line)."""
    try:
        return request({"op": "status"}, timeout=timeout, path=path)
    except CommitError as exc:
        raise RemoteError(f"no ckpt run answers: {exc}; is it still running?") from None


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
