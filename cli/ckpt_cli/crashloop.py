"""The crash-loop guard's decision: has the child failed N times in a row
right after a restore of one snapshot, before it saved anything newer?

Format checks cannot see everything (a pickle that unpickles to garbage, a
checkpoint that crashes the loader's C code): a child that fails again and
again on what it was given would spend every retry on the same bytes. The
guard counts the attempts that failed without a snapshot taken while they
ran (a snapshot the supervisor takes after an exit is not the child's
progress); the first of them started from snapshot S. When the streak
reaches the limit, S is the suspect, with every snapshot taken after the
exits of the streak (the same bytes and what the failures left). The
supervisor marks them in the repository and relaunches on the snapshot
before S. An attempt that succeeded, or that a snapshot shows got
somewhere, ends the streak; so does an attempt that started from no
snapshot (nothing to blame).

Pure: the supervisor feeds it attempts and acts on its answer.
"""

from __future__ import annotations

import dataclasses

#: Failures in a row, right after a restore, that make the restored snapshot
#: suspect (`--crash-loop`; 0 turns the guard off).
DEFAULT_LIMIT = 2


@dataclasses.dataclass(frozen=True)
class Snap:
    """A snapshot this run took: when its manifest was written, and why."""

    id: str
    generation: int
    created: float  # epoch seconds, when the manifest was written
    reason: str  # "change", "rescan", "commit", "exit", "final", ...


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The streak reached the limit: `suspect` (the snapshot the streak
    started from, first) are to be marked; `attempts` failed on them."""

    suspect: tuple[str, ...]
    attempts: tuple[int, ...]
    statuses: tuple[str, ...]


def progressed(snaps: list[Snap], launched: float, exited: float) -> bool:
    """A snapshot shows the attempt got somewhere: one written while it ran
    that the supervisor did not ask for at an exit."""
    return any(launched <= s.created <= exited and s.reason != "exit" for s in snaps)


@dataclasses.dataclass
class Guard:
    limit: int = DEFAULT_LIMIT
    base: str = ""  # the snapshot the streak's first attempt started from
    since: float = 0.0  # when that attempt was launched (epoch seconds)
    attempts: list[int] = dataclasses.field(default_factory=list)
    statuses: list[str] = dataclasses.field(default_factory=list)

    def reset(self) -> None:
        self.base, self.since = "", 0.0
        self.attempts, self.statuses = [], []

    def ended(
        self,
        *,
        attempt: int,
        started_from: str,
        launched: float,
        exited: float,
        failed: bool,
        status: str,
        snaps: list[Snap],
    ) -> Verdict | None:
        """Record one attempt's end (started from snapshot `started_from`, ''
        for none; `snaps`: the snapshots this run took so far). A Verdict
        when the streak reaches the limit; the streak starts over then."""
        if self.limit <= 0 or not failed or progressed(snaps, launched, exited):
            self.reset()
            return None
        if not self.attempts:
            if not started_from:
                return None  # started from nothing a snapshot holds: nothing to blame
            self.base, self.since = started_from, launched
        self.attempts.append(attempt)
        self.statuses.append(status)
        if len(self.attempts) < self.limit:
            return None
        after = [s.id for s in snaps if s.created >= self.since and s.id != self.base]
        verdict = Verdict((self.base, *after), tuple(self.attempts), tuple(self.statuses))
        self.reset()
        return verdict
