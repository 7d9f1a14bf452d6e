"""Fixtures of the fault-injection suite: the integration suite's (a private
file remote, the checkpoint dir, `spawn` for ckpt in the background)."""

from __future__ import annotations

from integration.conftest import ckpt_dir, remote, spawn  # noqa: F401
