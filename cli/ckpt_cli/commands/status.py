"""`ckpt status`: the live state of running supervisors, from another shell.

Without --socket it asks every `ckpt run` of this user on this machine (the
registry in `control`); with --socket (or CKPT_SOCKET, as inside the child)
only that one. A registry dir that is not this user's own and private is
not read (another user could plant entries there that point at their own
sockets). Every field of a reply is printed cleaned (`console`), and a
number that is not one is shown as "?": a reply is text from outside.
"""

from __future__ import annotations

import math
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
        problem = control.untrusted_registry()
        if problem:
            console.warn(f"{problem}: not read (give --socket to ask one run)")
        sockets = [] if problem else [str(info["socket"]) for info in control.registered()]
        if not sockets:
            if as_json:
                console.document({"runs": []})
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
        console.document({"runs": states})
        return ExitCode.OK
    for st in states:
        console.out(describe(st))
    return ExitCode.OK


def _number(st: dict[str, Any], key: str) -> float | None:
    """A finite number from a reply, or None (absent, or not a number)."""
    value = st.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _size(st: dict[str, Any], key: str) -> str:
    value = _number(st, key)
    return "?" if value is None and st.get(key) is not None else console.fmt_bytes(value or 0)


def _count(st: dict[str, Any], key: str, word: str) -> str:
    """A count from a reply, in English ("1 file", "3 files"); "?" if it is
    not a whole number."""
    value = _number(st, key)
    if value is None or not value.is_integer():
        return f"? {word}s" if st.get(key) is not None else f"0 {word}s"
    return console.plural(int(value), word)


def describe(st: dict[str, Any]) -> list[str]:
    """The lines of one run (the command's output; console.out cleans each,
    so a line break inside a field stays inside its line)."""
    age = _number(st, "last_snapshot_age")
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
        f"  upload backlog: {_size(st, 'backlog_bytes')} in {_count(st, 'backlog_files', 'file')}; "
        f"{_size(st, 'rate')}/s",
        f"  snapshots: {st.get('snapshots')}, {_size(st, 'bytes_uploaded')} uploaded",
    ]
    waiting = st.get("waiting_for")
    if isinstance(waiting, list) and waiting:
        files = [w for w in waiting if isinstance(w, dict)]
        shown = ", ".join(f"{w.get('path')} ({w.get('reason')})" for w in files[:3])
        more = f" and {len(files) - 3} more" if len(files) > 3 else ""
        seconds = _number(st, "waiting_seconds")
        settle = _number(st, "settle_timeout")
        lines.append(
            f"  snapshot waits for: {shown}{more}; "
            f"{console.fmt_age(seconds) if seconds is not None else '?'} so far"
            + (f" (at most {settle:g}s, --settle-timeout)" if settle is not None else "")
        )
    if st.get("last_error"):
        lines.append(f"  last error: {st['last_error']}")
    if st.get("preemption"):
        lines.append(f"  preemption notice: {st['preemption']}")
    return lines
