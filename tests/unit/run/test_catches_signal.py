"""catches_signal() reads the real kernel's view of a real process."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from ckpt_cli.run.child import catches_signal

WITH_HANDLER = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGUSR1, lambda *a: None)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)
WITHOUT = "import time\nprint('ready', flush=True)\ntime.sleep(60)\n"


@pytest.mark.parametrize(("code", "expected"), [(WITH_HANDLER, True), (WITHOUT, False)])
def test_catches_signal_sees_python_handlers(code: str, expected: bool) -> None:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert catches_signal(proc.pid, signal.SIGUSR1) is expected
        assert catches_signal(proc.pid, signal.SIGUSR2) is False
    finally:
        proc.kill()
        proc.wait()


def test_catches_signal_of_a_gone_process_is_false() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert catches_signal(proc.pid, signal.SIGUSR1) is False
