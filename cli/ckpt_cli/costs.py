"""What failures cost: for every failure the work lost and for every relaunch
the time to resume, computed from the run records (`history`) alone.

Pure: records in, numbers out, no clock, no I/O. The definitions are the
README's ("What failures cost" under Run history); in short:

- An attempt runs from its start S (its child launched) to its end E (ckpt
  saw the child exit). A failure is an attempt that ended `failed`,
  `preempted` or `killed` (its run vanished without recording the end, and a
  later run followed: E is then the run's last sign of life, `seen`).
- Training position: the training time behind a state. A fresh start is 0;
  time t of attempt a is position(state a started from) + (t - S_a); a
  snapshot's position is that of the moment its state belongs to.
- Lost work of failure k: position(E_k) - position(state the next attempt
  started from); the next attempt is k+1 of the same run, else the first of
  the run that followed; with none yet, the newest snapshot any run of the
  rank recorded (what a new run restores): provisional.
- Time to resume of a relaunch n after failure k: S_n - E_k.

Records come from a remote and may be crafted: every field is checked, and a
value that is not what it should be is unknown, never a crash.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any

#: Outcomes of an attempt that are failures.
FAILURES = ("failed", "preempted", "killed")
OUTCOMES = ("succeeded", "stopped", *FAILURES)
#: Steps a walk back through states takes at most (crafted records may loop).
_WALK_LIMIT = 10_000
_MAX_TIME = 1e11


def _time(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and 0 <= value <= _MAX_TIME else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


@dataclasses.dataclass
class AttemptCost:
    """One attempt, as the costs see it. `end_seen`: the end is the run's
    last sign of life (a lower bound). `lost` (failures only) and `resume`
    (relaunches only) are None when unknown or not applicable; `spans` are
    the stretches of attempts (run, number, t0, t1) whose work was lost."""

    run: str
    index: int  # its place in its run's record
    number: int | None
    start: float | None
    end: float | None
    outcome: str | None  # one of OUTCOMES, None: running (or killed, unseen)
    exit: str
    host: str
    resumed: str | None  # the snapshot it started from, "" nothing, None unknown
    end_seen: bool = False
    lost: float | None = None
    provisional: bool = False  # lost against what a new run would restore
    resume: float | None = None
    after: tuple[str, int | None] | None = None  # the failure a relaunch follows
    #: The relaunch that followed this failure, if one did.
    followed_by: AttemptCost | None = dataclasses.field(default=None, repr=False)
    spans: list[tuple[str, int | None, float, float]] = dataclasses.field(default_factory=list)

    @property
    def failure(self) -> bool:
        return self.outcome in FAILURES


@dataclasses.dataclass
class Snap:
    id: str
    run: str
    attempt: int | None
    captured: float
    changed: float | None
    moment: float = 0.0  # when its state was the child's (see `_moments`)


@dataclasses.dataclass
class RunCosts:
    run: str
    rank: int
    host: str
    started: float
    ended: float | None
    attempts: list[AttemptCost]
    snapshots: list[Snap]
    preemption: float | None  # when the notice was received
    continues: str | None = None  # the failed run this one resumed
    #: The facts these numbers come from were recorded; False: an older ckpt
    #: wrote the record, and its lost work and times to resume are unknown.
    recorded: bool = True
    #: Older snapshots dropped from the record (it keeps the newest ones).
    dropped: int = 0

    @property
    def failures(self) -> int:
        return sum(a.failure for a in self.attempts)

    @property
    def lost(self) -> float | None:
        """The work its failures lost; None if any one's is unknown."""
        values = [a.lost for a in self.attempts if a.failure]
        return None if any(v is None for v in values) else math.fsum(v or 0.0 for v in values)

    @property
    def resume(self) -> float | None:
        """Its time to resume, all relaunches; None if any one's is unknown."""
        values = [a.resume for a in self.attempts if a.after is not None]
        return None if any(v is None for v in values) else math.fsum(v or 0.0 for v in values)

    def totals(self) -> dict[str, Any]:
        """As the JSON forms carry them (`costs`, the `end` event)."""
        lost, resume = self.lost, self.resume
        return {
            "failures": self.failures,
            "lost_seconds": None if lost is None else round(lost, 3),
            "resume_seconds": None if resume is None else round(resume, 3),
        }


def attempt_outcome(status: int, *, preempted: bool, stopped: bool) -> str:
    """How an attempt ended, for the record: preempted if a notice came first
    (and it did not finish on its own), stopped by a stop signal to ckpt,
    else by its status."""
    if status == 0 and not stopped:
        return "succeeded"
    if preempted:
        return "preempted"
    if stopped:
        return "stopped"
    return "failed"


def _attempt(run: Mapping[str, Any], raw: Mapping[str, Any], index: int, last: bool) -> AttemptCost:
    start = _time(raw.get("started"))
    end = _time(raw.get("ended"))
    outcome = raw.get("outcome") if raw.get("outcome") in OUTCOMES else None
    status = _int(raw.get("status"))
    run_outcome = run.get("outcome")
    if outcome is None and status is not None:  # an older record: inferred
        if status == 0:
            outcome = "succeeded"
        elif last and run_outcome in ("preempted", "stopped"):
            outcome = str(run_outcome)
        else:
            outcome = "failed"
    if outcome is None and last and isinstance(run_outcome, str):
        # The run ended (an error in ckpt) without recording this attempt's end.
        outcome = run_outcome if run_outcome in ("preempted", "stopped") else "failed"
        end = _time(run.get("ended"))
    resumed = _str(raw.get("resumed"))
    return AttemptCost(
        run=str(run["run"]),
        index=index,
        number=_int(raw.get("number")),
        start=start,
        end=end,
        outcome=outcome,
        exit=_str(raw.get("exit")) or "",
        host=_str(run.get("host")) or "",
        resumed=resumed,
    )


def _snaps(run: Mapping[str, Any]) -> list[Snap]:
    raw = run.get("snapshots")
    out: list[Snap] = []
    for s in raw if isinstance(raw, list) else []:
        if not isinstance(s, dict):
            continue
        sid, captured = _str(s.get("id")), _time(s.get("captured"))
        if sid and captured is not None:
            out.append(Snap(sid, str(run["run"]), _int(s.get("attempt")), captured, None))
            out[-1].changed = _time(s.get("changed"))
    return out


def _clamp(t: float, low: float | None, high: float | None) -> float:
    if high is not None:
        t = min(t, high)
    if low is not None:
        t = max(t, low)
    return t


def _moments(snaps: list[Snap], attempts: Mapping[int | None, AttemptCost]) -> None:
    """A snapshot's state belongs to the moment it was captured (ckpt began
    reading the directory), or earlier: to the newest modification of a file
    it holds in a version its parent did not, but not before the run's
    previous capture; and within its attempt (one taken after the child
    ended holds what the child left)."""
    previous: float | None = None
    for s in snaps:
        a = attempts.get(s.attempt)
        moment = s.captured
        if s.changed is not None:
            moment = min(moment, s.changed if previous is None else max(s.changed, previous))
        if a is not None:
            moment = _clamp(moment, a.start, a.end)
        s.moment = moment
        previous = s.captured


class Ledger:
    """Every run's costs, from every record of a repository (load_runs's
    order: oldest start first)."""

    def __init__(self, records: Iterable[Mapping[str, Any]]) -> None:
        self.runs: dict[str, RunCosts] = {}
        self._snaps: dict[str, Snap] = {}
        self._by_key: dict[tuple[str, int | None], AttemptCost] = {}
        self._single: dict[str, bool] = {}
        self._lanes: dict[int, list[RunCosts]] = {}
        #: Per run: its newest snapshot of each attempt number.
        self._last: dict[str, dict[int | None, str]] = {}
        #: The run that followed each run (same rank, with attempts).
        self._follower: dict[str, RunCosts] = {}
        #: Where each attempt's start stands (see `_start`), by id().
        self._starts: dict[int, tuple[tuple[str, Any], float]] = {}
        for rec in records:
            self._add(rec)
        for lane in self._lanes.values():
            self._link(lane)
        for lane in self._lanes.values():
            for rc in lane:
                for i, a in enumerate(rc.attempts):
                    self._cost(rc, i, a, lane)

    def _add(self, rec: Mapping[str, Any]) -> None:
        run = str(rec["run"])
        if run in self.runs:
            return
        raws = [a for a in rec.get("attempts", []) if isinstance(a, dict)]
        attempts = [_attempt(rec, a, i, i == len(raws) - 1) for i, a in enumerate(raws)]
        rank = _int(rec.get("rank"))
        pre = rec.get("preemption")
        rc = RunCosts(
            run=run,
            rank=rank or 0,
            host=_str(rec.get("host")) or "",
            started=float(rec["started"]),
            ended=_time(rec.get("ended")),
            attempts=attempts,
            snapshots=_snaps(rec),
            preemption=_time(pre.get("received")) if isinstance(pre, dict) else None,
            recorded="snapshots" in rec,
            dropped=_int(rec.get("snapshots_dropped")) or 0,
        )
        self.runs[run] = rc
        self._single[run] = rank is None
        by_number = {a.number: a for a in attempts}
        for a in attempts:
            self._by_key.setdefault((run, a.number), a)
        if attempts and attempts[-1].end is None and attempts[-1].outcome is None:
            seen = _time(rec.get("seen"))
            attempts[-1].end = seen  # used only if a later run shows it died
        _moments(rc.snapshots, by_number)
        for s in rc.snapshots:
            self._snaps.setdefault(s.id, s)
        self._last[run] = {s.attempt: s.id for s in rc.snapshots}
        self._lanes.setdefault(rc.rank, []).append(rc)

    def _link(self, lane: list[RunCosts]) -> None:
        """A run with attempts follows the one before it (same rank, by
        start); it continues it when that one's last attempt failed. A last
        attempt without an end whose run was followed was killed."""
        active = [rc for rc in lane if rc.attempts]
        for before, after in itertools.pairwise(active):
            self._follower[before.run] = after
            last = before.attempts[-1]
            if last.outcome is None:
                last.outcome, last.end_seen = "killed", True
            if last.failure:
                after.continues = before.run
        for rc in active[-1:]:
            last = rc.attempts[-1]
            if last.outcome is None:
                last.end = None  # running, or killed and not followed yet: no end known

    # -- states and positions

    def _state(self, rc: RunCosts, i: int) -> tuple[str, Any]:
        """What attempt i of rc started from: ("fresh", None), ("snap", id),
        ("unknown", key). A relaunch on one node starts from --dir as the
        attempt before left it: its newest snapshot, else that one's state."""
        for _ in range(_WALK_LIMIT):
            a = rc.attempts[i]
            if i > 0 and self._single[rc.run]:
                before = rc.attempts[i - 1]
                taken = self._last[rc.run].get(before.number)
                if taken is not None:
                    return ("snap", taken)
                if rc.dropped and (not rc.snapshots or _before(before, rc.snapshots[0])):
                    return ("unknown", (rc.run, a.number))  # its snapshots were dropped
                i -= 1
                continue
            if a.resumed is None:
                return ("unknown", (rc.run, a.number))
            return ("fresh", None) if a.resumed == "" else ("snap", a.resumed)
        return ("loop", None)

    def _start(self, a: AttemptCost) -> tuple[tuple[str, Any], float]:
        """Where attempt a's start stands: (root, offset), offset the training
        time since root (a fresh start, or the first state no record knows).
        Each attempt's is worked out once: going back from state to state,
        a long history is walked once, not once per failure."""
        path: list[tuple[AttemptCost, float]] = []  # attempts and what their state adds
        seen: set[int] = set()
        cur = a
        base: tuple[tuple[str, Any], float] | None = None
        while id(cur) not in self._starts:
            if id(cur) in seen or len(path) >= _WALK_LIMIT:
                base = (("loop", None), 0.0)  # a crafted record: never the same root
                break
            seen.add(id(cur))
            root = self._state(self.runs[cur.run], cur.index)
            snap = self._snaps.get(root[1]) if root[0] == "snap" else None
            owner = None if snap is None else self._by_key.get((snap.run, snap.attempt))
            if snap is None or owner is None:
                base = (root, 0.0)
                break
            if owner.start is None:
                base = (("unknown", (owner.run, owner.number, snap.moment)), 0.0)
                break
            path.append((cur, max(snap.moment, owner.start) - owner.start))
            cur = owner
        if base is None:
            base = self._starts[id(cur)]
        else:
            self._starts[id(cur)] = base
        for att, adds in reversed(path):
            base = (base[0], base[1] + adds) if base[0][0] != "loop" else base
            self._starts[id(att)] = base
        return self._starts[id(a)]

    def _at(self, a: AttemptCost, t: float) -> tuple[tuple[str, Any], float]:
        """Where time t of attempt a stands (see `_start`)."""
        if a.start is None:
            return ("unknown", (a.run, a.number, t)), 0.0
        root, offset = self._start(a)
        return root, offset + max(0.0, t - a.start)

    def _spans(
        self, a: AttemptCost, t: float, budget: float
    ) -> list[tuple[str, int | None, float, float]]:
        """The stretches of attempts (run, number, t0, t1) that make up the
        last `budget` seconds of training before time t of attempt a."""
        spans: list[tuple[str, int | None, float, float]] = []
        for _ in range(_WALK_LIMIT):
            if a.start is None or budget <= 0:
                break
            t = max(t, a.start)
            spans.append((a.run, a.number, max(a.start, t - budget), t))
            budget -= t - a.start
            root = self._state(self.runs[a.run], a.index)
            snap = self._snaps.get(root[1]) if root[0] == "snap" else None
            owner = None if snap is None else self._by_key.get((snap.run, snap.attempt))
            if snap is None or owner is None:
                break
            a, t = owner, snap.moment
        return spans

    def _cost(self, rc: RunCosts, i: int, a: AttemptCost, lane: list[RunCosts]) -> None:
        if i > 0:
            k: AttemptCost | None = rc.attempts[i - 1]
        elif rc.continues is not None:
            k = self.runs[rc.continues].attempts[-1]
        else:
            k = None
        if k is not None:
            a.after, a.resume = (k.run, k.number), _diff(a.start, k.end)
            k.followed_by = a
        if not a.failure or a.end is None or not rc.recorded:
            return
        end_root, end_offset = self._at(a, a.end)
        nxt = self._next(rc, i)
        if nxt is not None:
            if nxt.start is None:
                return
            root, offset = self._start(nxt)
        else:
            a.provisional = True
            root, offset = self._newest(lane)
        if root == end_root and root[0] != "loop":
            a.lost = max(0.0, end_offset - offset)
            a.spans = self._spans(a, a.end, a.lost)

    def _next(self, rc: RunCosts, i: int) -> AttemptCost | None:
        """The attempt after attempt i of rc: in rc, else the first of the
        run that continued rc."""
        if i + 1 < len(rc.attempts):
            return rc.attempts[i + 1]
        after = self._follower.get(rc.run)
        return after.attempts[0] if after is not None and after.continues == rc.run else None

    def _newest(self, lane: list[RunCosts]) -> tuple[tuple[str, Any], float]:
        """The position of what a new run would restore: the newest snapshot
        any run of the rank recorded (only what is durable counts)."""
        newest = max((s for r in lane for s in r.snapshots), key=lambda s: s.captured, default=None)
        if newest is None:
            return ("fresh", None), 0.0
        owner = self._by_key.get((newest.run, newest.attempt))
        if owner is None:
            return ("snap", newest.id), 0.0
        return self._at(owner, newest.moment)


def _before(a: AttemptCost, s: Snap) -> bool:
    """Attempt a started before snapshot s was captured (or it is not known)."""
    return a.start is None or a.start < s.captured


def _diff(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else max(0.0, later - earlier)


def chain(ledger: Ledger, run: str, limit: int = 10) -> list[RunCosts]:
    """run and the failed runs it continued, oldest first (at most limit)."""
    out: list[RunCosts] = []
    at: str | None = run
    while at is not None and at in ledger.runs and len(out) < limit:
        rc = ledger.runs[at]
        if rc in out:
            break
        out.append(rc)
        at = rc.continues
    return out[::-1]


def describe(totals: Mapping[str, Any]) -> str:
    """ "3 failures, 2 min 10 s of work lost, 41 s resuming"."""
    from ckpt_cli.console import plural

    n = int(totals["failures"])
    lost, resume = totals["lost_seconds"], totals["resume_seconds"]
    parts = [plural(n, "failure")]
    if n:
        parts.append("work lost unknown" if lost is None else f"{duration(lost)} of work lost")
    if resume is None:
        parts.append("time resuming unknown")
    elif resume or n:
        parts.append(f"{duration(resume)} resuming")
    return ", ".join(parts)


def duration(seconds: float) -> str:
    """12 s, 2 min 10 s, 3 h 02 min, 2 d 04 h; under 10 s with a tenth."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    m, s = divmod(round(seconds), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h:02d} h"
