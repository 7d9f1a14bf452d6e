"""The run loop of `ckpt run`: the supervisor, the child it launches, and the
preemption notices it watches for."""

from __future__ import annotations
