"""The checkpoint signal: the supervisor's "save soon, this machine is going away".

The first call of preemption_requested() / on_preemption() (or checkpoint())
installs a handler for the signal named in $CKPT_CHECKPOINT_SIGNAL (default
SIGUSR1) and tells the supervisor, which only sends the signal to children
that asked for it (an unprepared child would be killed by SIGUSR1). The
handler sets a flag and runs the callbacks; a handler installed before ours
is still called. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import warnings
from collections.abc import Callable
from typing import Any

from ckpt import _control
from ckpt._contract import ENV_CHECKPOINT_SIGNAL

_flag = threading.Event()
_callbacks: list[Callable[[], None]] = []
_lock = threading.Lock()
_installed = False
_previous: Any = None


def checkpoint_signal() -> signal.Signals:
    name = os.environ.get(ENV_CHECKPOINT_SIGNAL) or "SIGUSR1"
    try:
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except KeyError:
        return signal.SIGUSR1


def _handler(signum: int, frame: Any) -> None:
    _flag.set()
    for cb in list(_callbacks):
        cb()
    if callable(_previous):
        _previous(signum, frame)


def install() -> bool:
    """Install the handler once (main thread only); True if it is in place."""
    global _installed, _previous
    with _lock:
        if _installed:
            return True
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "ckpt: the checkpoint-signal handler can only be installed from the main "
                "thread: call ckpt.checkpoint() there first",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        sig = checkpoint_signal()
        _previous = signal.signal(sig, _handler)
        _installed = True
    if _control.socket_path() is not None:
        # An old or busy supervisor: the handler still works for manual signals.
        with contextlib.suppress(_control.CommitError):
            _control.request({"op": "hello", "pid": os.getpid(), "signal": sig.name}, timeout=5)
    return True


def preemption_requested() -> bool:
    """True once the checkpoint signal arrived: save at the next safe point."""
    install()
    return _flag.is_set()


def on_preemption(callback: Callable[[], None]) -> None:
    """Call `callback` (from the signal handler: keep it short) on the checkpoint signal."""
    install()
    _callbacks.append(callback)
