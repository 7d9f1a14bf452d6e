"""`ckpt signal`: tell the supervised script to checkpoint soon, through a
supervisor's control socket (the one of --dir when several run).
"""

from __future__ import annotations

from pathlib import Path

from ckpt._contract import ExitCode
from ckpt_cli import config, console
from ckpt_cli.commands._request import request
from ckpt_cli.errors import CkptError


def send_signal(socket_path: str | None, directory: Path | None = None) -> int:
    """Send the checkpoint signal through a supervisor's control socket: the
    given one (--socket, or CKPT_SOCKET inside a supervised child), else the
    running `ckpt run` of this user found in the registry `ckpt status`
    reads (the one of `directory` when several run)."""
    if not socket_path:
        from ckpt_cli import control

        problem = control.untrusted_registry()
        if problem:
            console.warn(f"{problem}: not read (give --socket)")
        entries = [] if problem else control.registered()
        socket_path = str(control.pick_run(entries, directory)["socket"])
    reply = request(socket_path, {"op": "signal"})
    if not reply.get("ok"):
        raise CkptError(f"signal not sent: {reply.get('error')}", exit_code=ExitCode.UNAVAILABLE)
    sent = [str(p) for p in reply.get("pids", [])]
    console.info(
        f"checkpoint signal sent to {'pid' if len(sent) == 1 else 'pids'} {', '.join(sent)}"
    )
    return ExitCode.OK


def main(socket: str | None, dir: Path | None) -> int:
    """`ckpt signal`: the socket given, else the run of --dir (when it is set
    anywhere ckpt run reads it), else the only run."""
    directory = None
    if not socket:
        settings = config.load({"dir": dir} if dir is not None else {}, names=("dir",))
        if settings.values["dir"].source != config.DEFAULT:
            directory = settings["dir"]
    return send_signal(socket, directory)
