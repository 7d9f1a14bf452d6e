"""The single-writer lease: lease.json names its holder (owner, host, boot id,
PID and time namespace, pid and the pid's start time) and carries a heartbeat
(a wall-clock time, a beat counter, the interval and the ttl). One `ckpt run`,
`ckpt push` or `ckpt gc` writes to a remote at a time; readers need no lease.

When a lease not our own may be taken over (`judge`, README "One writer per
remote"). A pid means something only in the PID namespace that wrote it, and a
heartbeat time only on the clock of the machine that wrote it, so:
- at once only when its holder is provably gone: the lease is unreadable (no
  ckpt writes that), or it was written on this host, in this boot, PID and
  time namespace, by a pid that no longer exists or is another process now
  (its start time differs);
- a lease whose heartbeat is fresh by this machine's clock is live;
- any other lease (a heartbeat stale or in the future by this machine's clock,
  this host name before a reboot) is watched: taken over only once this
  process has seen it unchanged for the holder's ttl, measured on its own
  monotonic clock. Every beat changes the document (the counter), so a live
  holder shows whatever the clocks of the two machines say.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Literal

from ckpt_cli import processes as subtree
from ckpt_cli.backends import Backend, NotFound
from ckpt_cli.errors import LeaseHeldError, RemoteError
from ckpt_cli.manifest import host_name

LEASE_KEY = "lease.json"
#: The ttl of a lease when nothing says otherwise (`ckpt push`, `ckpt gc`).
DEFAULT_TTL = 60.0
#: The range of a lease's ttl (seconds): what it is given is brought into it,
#: so a lease always holds a finite ttl (infinity means a day).
MIN_TTL = 1.0
MAX_TTL = 86400.0
#: How long a claim is left before it is read back: a check-then-put, and a
#: takeover (an overwrite; another contender may have decided at the same time).
CONFIRM_CREATE = 0.05
CONFIRM_TAKEOVER = 0.5


class LeaseLostError(RemoteError):
    """Another writer took the lease over: this one must stop writing."""


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def sane_ttl(value: object, default: float = DEFAULT_TTL) -> float:
    """A ttl to write and judge a lease with: seconds in [MIN_TTL, MAX_TTL].
    Infinity (or more) is MAX_TTL; NaN, a bool or not a number is `default`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    if isinstance(value, float) and math.isnan(value):
        return default
    if value >= MAX_TTL:
        return MAX_TTL
    return max(MIN_TTL, float(value))


def _ns(kind: str) -> str:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return ""


@dataclasses.dataclass(frozen=True)
class Place:
    """Where a process runs, as far as its pid and start time mean anything:
    the host, its boot, and the PID and time namespaces ("" where unknown)."""

    host: str
    boot: str
    pidns: str
    timens: str


def here() -> Place:
    return Place(host_name(), boot_id(), _ns("pid"), _ns("time"))


def holder_gone(pid: int, start: int | None) -> str | None:
    """Why the process pid (of this PID namespace) that wrote a lease is gone
    for sure, or None: it may still run."""
    if not subtree.pid_alive(pid):
        return f"its process {pid} on this host is gone"
    if start is not None and subtree.proc_is_ours():
        now = subtree.start_time(pid)
        if now is not None and now != start:
            return f"its process {pid} on this host is gone (the pid is another process's now)"
    return None


#: Above any pid a kernel hands out (PID_MAX_LIMIT): a lease naming one is crafted.
PID_LIMIT = 1 << 22


def _number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a contender may do with a lease that is not its own: take it over
    at once, watch it for `ttl` seconds first, or refuse (it is live)."""

    action: Literal["take", "watch", "refuse"]
    why: str
    ttl: float


def judge(
    doc: dict[str, Any],
    *,
    place: Place,
    now: float,
    default_ttl: float,
    gone: Callable[[int, int | None], str | None] = holder_gone,
) -> Verdict:
    """The rule of the module docstring. `now` is this machine's wall clock;
    `gone` asks about a pid of this PID namespace."""
    ttl = sane_ttl(doc.get("ttl"), sane_ttl(default_ttl))
    heartbeat: Any = doc.get("heartbeat")
    if "owner" not in doc or not _number(heartbeat):
        return Verdict("take", "it is unreadable", ttl)
    host, boot, pid, start = doc.get("host"), doc.get("boot"), doc.get("pid"), doc.get("start")
    same_boot = host == place.host and bool(boot) and boot == place.boot
    if (
        same_boot
        and place.pidns
        and doc.get("pidns") == place.pidns
        and doc.get("timens", "") == place.timens
        and isinstance(pid, int)
        and not isinstance(pid, bool)
        and 0 < pid < PID_LIMIT
    ):
        why = gone(pid, start if isinstance(start, int) and not isinstance(start, bool) else None)
        if why is not None:
            return Verdict("take", why, ttl)
    if host == place.host and boot and place.boot and boot != place.boot:
        why = "it was written before this host rebooted (or by another machine of this name)"
        return Verdict("watch", why, ttl)
    age = now - float(heartbeat)
    if 0 <= age <= ttl:
        return Verdict("refuse", f"heartbeat {age:.0f}s ago", ttl)
    if age > ttl:
        why = f"its last heartbeat is {age:.0f}s old by this machine's clock (timeout {ttl:.0f}s)"
    else:
        why = f"its heartbeat is {-age:.0f}s ahead of this machine's clock"
    return Verdict("watch", why, ttl)


def _poll(ttl: float) -> float:
    """How often a lease being watched is read: 20 times a ttl, 0.1 to 2 s."""
    return min(2.0, max(0.1, ttl / 20))


#: What this process has seen of other writers' leases: (remote, key) -> the
#: document and the monotonic time it was first seen so (`Lease.live`).
_seen: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}
_seen_lock = threading.Lock()


class Lease:
    """One lease document (lease.json, or ranks/<r>/lease.json): acquired,
    beaten, released by its holder; judged by everyone else."""

    def __init__(
        self,
        backend: Backend,
        owner: str,
        ttl: float,
        *,
        key: str = LEASE_KEY,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        #: lease.json, or ranks/<r>/lease.json: one lease per rank's stream.
        self.key = key
        self.backend = backend
        stream = key.rsplit("/", 1)[0] if "/" in key else ""
        #: What error messages name: the remote, and the rank for a rank's lease.
        rank = stream.replace("ranks/", "rank ")
        self.where = f"{backend.display} ({rank})" if stream else backend.display
        self.owner = owner
        self.ttl = sane_ttl(ttl)
        self.held = False
        self._clock = clock
        self._sleep = sleep
        self._beats = 0
        self._place = here()
        self._start = subtree.start_time("self")

    @property
    def interval(self) -> float:
        """Seconds between beats: four beats within a ttl."""
        return self.ttl / 4

    def _doc(self) -> bytes:
        self._beats += 1
        place = self._place
        return json.dumps(
            {
                "owner": self.owner,
                "host": place.host,
                "boot": place.boot,
                "pidns": place.pidns,
                "timens": place.timens,
                "pid": os.getpid(),
                "start": self._start,
                "heartbeat": time.time(),
                "beat": self._beats,
                "interval": self.interval,
                "ttl": self.ttl,
            },
            allow_nan=False,
        ).encode()

    def read(self) -> dict[str, Any] | None:
        """The lease as stored now: None if there is none, {} if it is not a
        lease document (garbage: stale), else its fields."""
        try:
            doc = json.loads(self.backend.read(self.key))
        except NotFound:
            return None
        except (ValueError, RecursionError):
            return {}  # garbage (or nested deeper than the parser's stack): stale
        return doc if isinstance(doc, dict) else {}

    def judge(self, doc: dict[str, Any]) -> Verdict:
        return judge(doc, place=self._place, now=time.time(), default_ttl=self.ttl)

    # -- a contender

    def acquire(self, on_wait: Callable[[str], None] = lambda _message: None) -> str | None:
        """Take the lease or raise LeaseHeldError; returns why an old one was
        taken over. on_wait hears it when a lease is watched before a takeover."""
        backend = self.backend
        # A create that cannot race (a local directory: a hard link, or O_EXCL)
        # needs no confirmation; a check-then-put or a takeover (an overwrite)
        # does.
        if backend.create_exclusive(self.key, self._doc()):
            took_over = None
            confirm = 0.0 if backend.exclusive_create else CONFIRM_CREATE
        else:
            took_over, confirm = self._claim(on_wait)
        if confirm:  # wait out a racing writer's put, then see whose lease it is
            self._sleep(confirm)
            doc = self.read()
            if not doc or doc.get("owner") != self.owner:
                raise LeaseHeldError(
                    f"remote {self.where} was claimed by another ckpt at the same moment; "
                    "only one writer may use a remote"
                )
        self.held = True
        return took_over

    def _claim(self, on_wait: Callable[[str], None]) -> tuple[str | None, float]:
        """Claim an existing lease: why the old one was taken over (None: it
        is ours), and how long to wait before reading the claim back."""
        doc = self.read()
        if doc is not None and doc.get("owner") == self.owner:
            return None, CONFIRM_CREATE
        if doc is None:
            self.backend.write(self.key, self._doc())
            return "it was released", CONFIRM_CREATE
        verdict = self.judge(doc)
        if verdict.action == "refuse":
            raise self._held_by(doc, f"{verdict.why} by this machine's clock", verdict.ttl)
        why = verdict.why
        if verdict.action == "watch":
            on_wait(
                f"lease on {self.where}: {why}; watching it for {verdict.ttl:.0f}s "
                "before taking it over (a live holder changes it)"
            )
            changed, now = self._watch(doc, verdict.ttl)
            if changed and now is None:  # released meanwhile: create it anew
                if self.backend.create_exclusive(self.key, self._doc()):
                    return "it was released", CONFIRM_CREATE
                now = self.read() or doc
            if changed:
                raise self._held_by(
                    now or doc,
                    f"it changed while this run watched it for up to {verdict.ttl:.0f}s",
                    verdict.ttl,
                )
            why = f"{why}, and it did not change in {verdict.ttl:.0f}s of watching"
        self.backend.write(self.key, self._doc())
        return why, CONFIRM_TAKEOVER

    def _watch(self, doc: dict[str, Any], ttl: float) -> tuple[bool, dict[str, Any] | None]:
        """Read the lease until it differs from doc (True, what it is now:
        None if deleted) or ttl seconds of this process's monotonic clock
        passed without a change (False, doc). The last read is the newest."""
        began = self._clock()
        while True:
            self._sleep(min(_poll(ttl), max(0.0, ttl - (self._clock() - began))))
            now = self.read()
            if now != doc:
                return True, now
            if self._clock() - began >= ttl:
                return False, doc

    def _held_by(self, doc: dict[str, Any], how: str, ttl: float) -> LeaseHeldError:
        pid = doc.get("pid")
        if doc.get("host") == self._place.host and doc.get("pidns") not in (
            None,
            self._place.pidns,
        ):
            pid = f"{pid} of another PID namespace"
        return LeaseHeldError(
            f"remote {self.where} is in use by ckpt on host {doc.get('host')} "
            f"(pid {pid}; {how}); stop that run, or wait: a lease whose heartbeat "
            f"does not change for {ttl:.0f}s is taken over (--lease-timeout)"
        )

    def live(self) -> bool:
        """Whether a writer holds this lease, from one look and what this
        process saw of it before: a lease that needs watching (see `judge`)
        is live until this process has seen it unchanged for its ttl."""
        doc = self.read()
        if doc is None:
            return False
        verdict = self.judge(doc)
        if verdict.action != "watch":
            return verdict.action == "refuse"
        return self._unchanged_for(doc, self._clock()) < verdict.ttl

    def _unchanged_for(self, doc: dict[str, Any], now: float) -> float:
        """Seconds this process has seen the lease as doc (0 the first time)."""
        where = (self.backend.display, self.key)
        with _seen_lock:
            seen = _seen.get(where)
            if seen is None or seen[0] != doc:
                _seen[where] = (doc, now)
                return 0.0
            return now - seen[1]

    # -- the holder

    def heartbeat(self) -> None:
        """Refresh; LeaseLostError if another writer owns the lease now."""
        doc = self.read()
        if doc is None:
            # Gone: another writer took it over and released it (or it was
            # deleted by hand). Writing it again would resurrect a writer whose
            # state is older than what the other one wrote since.
            self.held = False
            raise LeaseLostError(
                f"lease on {self.where} disappeared while this run held it "
                "(another writer took it over and finished?); this run stops writing snapshots"
            )
        if doc.get("owner") not in (None, self.owner):
            self.held = False
            raise LeaseLostError(
                f"lease on {self.where} was taken over by host {doc.get('host')} "
                f"pid {doc.get('pid')}; this run stops writing snapshots"
            )
        self.backend.write(self.key, self._doc())

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(RemoteError):
            doc = self.read()
            if doc is not None and doc.get("owner") == self.owner:
                self.backend.delete(self.key)


def live_leases(
    leases: Iterable[Lease],
    *,
    wait: bool = False,
    on_wait: Callable[[str], None] = lambda _message: None,
) -> list[Lease]:
    """The leases a writer holds (`Lease.live`). With wait, the leases that
    need watching are watched together until each changes (live) or stays
    unchanged for its ttl (not live), instead of counting as live."""
    leases = list(leases)
    if not wait:
        return [lease for lease in leases if lease.live()]
    live: list[Lease] = []
    watched: list[tuple[Lease, dict[str, Any], float]] = []
    for lease in leases:
        doc = lease.read()
        if doc is None:
            continue
        verdict = lease.judge(doc)
        if verdict.action == "refuse":
            live.append(lease)
        elif verdict.action == "watch":
            watched.append((lease, doc, verdict.ttl))
    if not watched:
        return live
    clock, sleep = watched[0][0]._clock, watched[0][0]._sleep
    longest = max(ttl for _lease, _doc, ttl in watched)
    on_wait(
        f"{', '.join(lease.where for lease, _doc, _ttl in watched)}: a lease looks stale; "
        f"watching for up to {longest:.0f}s whether its heartbeat changes"
    )
    began = clock()
    while watched:
        sleep(_poll(longest))
        still = []
        for lease, doc, ttl in watched:
            now = lease.read()
            if now != doc:
                if now is not None:  # it beat (or another writer holds it now)
                    live.append(lease)
            elif clock() - began < ttl:
                still.append((lease, doc, ttl))
        watched = still
    return [lease for lease in leases if lease in live]


class Heartbeat:
    """Keeps a held lease fresh: a daemon thread beats every `lease.interval`
    seconds. A failed beat is reported (once until one succeeds) and tried
    again, whatever the error: the thread ends only when stopped or when the
    lease is lost. `check()`, before each write, raises LeaseLostError once
    the lease is lost, and beats at once when the last beat is older than
    half the ttl (a process that was frozen may have lost the lease without
    its thread having seen it yet)."""

    def __init__(
        self,
        lease: Lease,
        *,
        on_lost: Callable[[LeaseLostError], None] = lambda _exc: None,
        on_error: Callable[[str], None] = lambda _message: None,
    ) -> None:
        self.lease = lease
        self.on_lost = on_lost
        self.on_error = on_error
        self.lost: LeaseLostError | None = None
        self._last = (time.monotonic(), time.time())  # the lease was just written
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ckpt-lease", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        warned = False
        while not self._stop.wait(self.lease.interval):
            try:
                self.beat()
                warned = False
            except LeaseLostError:
                return
            except Exception as exc:
                if not warned:
                    self.on_error(f"lease heartbeat failed: {exc or type(exc).__name__}")
                    warned = True

    def beat(self) -> None:
        with self._lock:
            if self.lost is not None:
                raise self.lost
            try:
                self.lease.heartbeat()
            except LeaseLostError as exc:
                self.lost = exc
                self.on_lost(exc)
                raise
            self._last = (time.monotonic(), time.time())

    def age(self) -> float:
        """Seconds since the last beat: the larger of the two clocks (the
        monotonic one stands still while the machine is suspended)."""
        mono, wall = self._last
        return max(time.monotonic() - mono, time.time() - wall)

    def check(self) -> None:
        if self.lost is not None:
            raise self.lost
        if self.age() > self.lease.ttl / 2:
            self.beat()
