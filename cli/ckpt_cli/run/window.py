"""The preemption window: from the moment the loop takes a notice in to the
moment the machine goes away, when the child is stopped, how long its grace
may be, and how long the final flush may take. One value, on the loop's
monotonic clock; the notice board the watcher thread posts to.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

from ckpt_cli import console
from ckpt_cli.run import preemption

#: After a preemption notice the child runs on (told to checkpoint, a snapshot
#: under way) for half the window, or less so that at least RESERVE seconds
#: remain; then it is stopped, and the rest goes to its grace and the flush.
NOTICE_SHARE = 0.5
NOTICE_RESERVE = 10.0
#: How long a stopped child may take during a notice window, at most: a third
#: of what is left, so the final flush keeps the rest.
NOTICE_GRACE_SHARE = 1 / 3
#: Past the notice's deadline the machine is gone; the final flush tries a
#: little beyond it anyway: the notice's clock is not ours.
FLUSH_BEYOND = 5.0


@dataclasses.dataclass(frozen=True)
class PreemptionWindow:
    taken_at: float  # monotonic time the loop took the notice in
    deadline: float  # monotonic time the machine goes away
    stop_at: float  # when the loop stops the child

    @classmethod
    def open(cls, seconds_left: float | None, now: float) -> PreemptionWindow:
        """The window of a notice with seconds_left (None: GCP's, unsaid)."""
        window = preemption.GCP_WINDOW if seconds_left is None else max(0.0, seconds_left)
        reserve = max(NOTICE_RESERVE, window * NOTICE_SHARE)
        return cls(now, now + window, now + max(0.0, window - reserve))

    @property
    def seconds(self) -> float:
        return self.deadline - self.taken_at

    def grace(self, grace: float, now: float) -> float:
        """--grace, cut short so the flush keeps time."""
        return max(0.0, min(grace, (self.deadline - now) * NOTICE_GRACE_SHARE))

    def flush_deadline(self, deadline: float) -> float:
        """The final flush's deadline (--flush-timeout's), bounded by the window."""
        return min(deadline, max(self.deadline, self.taken_at) + FLUSH_BEYOND)

    def history_wait(self, wait: float, now: float) -> float:
        """How long the run history's writer may take: not past the deadline."""
        return min(wait, max(1.0, self.deadline - now))


class NoticeBoard:
    """Where the watcher thread posts the notice (at any time), and the
    window the loop opened when it took it in (once)."""

    def __init__(self) -> None:
        self.notice: preemption.Notice | None = None
        self.window: PreemptionWindow | None = None

    def take(self, now: float, wall: float) -> PreemptionWindow | None:
        """Open the window of the posted notice; None if no new notice."""
        notice = self.notice
        if notice is None or self.window is not None:
            return None
        self.window = PreemptionWindow.open(notice.seconds_left(wall), now)
        return self.window

    def watch(
        self,
        poller: preemption.Poller,
        *,
        wake: Callable[[], None],
        on_hibernation: Callable[[preemption.Notice], None],
        stop: threading.Event,
        first_poll: threading.Event,
    ) -> None:
        """Poll for a notice in a thread of its own until stop is set: a final
        notice is posted here and wakes the loop; a hibernation is not final."""

        def on_notice(notice: preemption.Notice) -> None:
            if not notice.final:
                on_hibernation(notice)
                return
            self.notice = notice
            wake()

        def on_error(message: str) -> None:
            console.warn(f"preemption notices: {message}; still polling")

        threading.Thread(
            target=poller.watch,
            args=(stop, on_notice, on_error, first_poll),
            name="ckpt-preemption",
            daemon=True,
        ).start()
