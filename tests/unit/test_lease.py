"""The lease's liveness rule (ckpt_cli.lease): what a contender may do with a
lease that is not its own, decided from the document, this machine's place
and clock, and what it saw of the lease on its own monotonic clock. The
rule through the real binary: tests/faults/test_lease_liveness.py."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest

from ckpt_cli import processes as subtree
from ckpt_cli.backends import Backend, NotFound, open_backend
from ckpt_cli.errors import LeaseHeldError
from ckpt_cli.lease import (
    LEASE_KEY,
    MAX_TTL,
    Heartbeat,
    Lease,
    LeaseLostError,
    Place,
    judge,
    live_leases,
    sane_ttl,
)

HERE = Place(host="node-a", boot="boot-1", pidns="pid:[4026531836]", timens="time:[4026531834]")
NOW = 1_000_000.0


def _doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "owner": "run-x",
        "host": HERE.host,
        "boot": HERE.boot,
        "pidns": HERE.pidns,
        "timens": HERE.timens,
        "pid": 4242,
        "start": 777,
        "heartbeat": NOW - 1,
        "beat": 3,
        "interval": 15.0,
        "ttl": 60.0,
    }
    doc.update(overrides)
    return doc


def _judge(doc: dict[str, Any], gone: str | None = None, place: Place = HERE) -> tuple[str, str]:
    asked: list[tuple[int, int | None]] = []

    def ask(pid: int, start: int | None) -> str | None:
        asked.append((pid, start))
        return gone

    v = judge(doc, place=place, now=NOW, default_ttl=60.0, gone=ask)
    return v.action, v.why


# ---------------------------------------------------------------- judge (pure)


def test_a_gone_holder_of_this_host_boot_and_namespaces_is_taken_at_once() -> None:
    assert _judge(_doc(), gone="its process 4242 on this host is gone") == (
        "take",
        "its process 4242 on this host is gone",
    )


@pytest.mark.parametrize(
    "other",
    [
        {"pidns": "pid:[4026532175]"},  # another PID namespace: its pid means nothing here
        {"pidns": None},  # a lease that does not say (an older ckpt)
        {"timens": "time:[4026532999]"},  # start times are per time namespace
        {"host": "node-b"},
        {"boot": ""},
    ],
)
def test_a_pid_is_asked_about_only_in_its_own_namespace(other: dict[str, Any]) -> None:
    """Where the pid cannot be checked here, a fresh heartbeat is live even
    though a process of that number does not exist in this namespace."""
    action, why = _judge(_doc(**other), gone="its process 4242 on this host is gone")
    assert action == "refuse", why


def test_a_fresh_heartbeat_is_live_a_stale_one_is_only_watched() -> None:
    assert _judge(_doc(heartbeat=NOW - 59))[0] == "refuse"
    action, why = _judge(_doc(heartbeat=NOW - 300, host="node-b"))
    assert action == "watch" and "300s old by this machine's clock" in why


def test_a_heartbeat_from_this_machines_future_is_watched() -> None:
    """This clock is behind the holder's: the age proves nothing either way."""
    action, why = _judge(_doc(heartbeat=NOW + 300, host="node-b"))
    assert action == "watch" and "ahead of this machine's clock" in why


def test_another_boot_of_this_host_name_is_watched_not_taken() -> None:
    """A reboot of this host, or another machine that has its name: only
    watching tells them apart."""
    action, why = _judge(_doc(boot="boot-0"), gone="gone")
    assert action == "watch" and "rebooted" in why


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"owner": "x"},
        {"owner": "x", "heartbeat": "soon"},
        {"owner": "x", "heartbeat": math.nan},
    ],
)
def test_an_unreadable_lease_is_taken(doc: dict[str, Any]) -> None:
    assert _judge(doc) == ("take", "it is unreadable")


@pytest.mark.parametrize(
    ("crafted", "action"),
    [
        ({"heartbeat": 10**400}, "take"),  # unreadable
        ({"pid": 2**40}, "refuse"),  # no such pid: not asked about, the heartbeat is fresh
        ({"pid": -1}, "refuse"),
        ({"pid": True}, "refuse"),
        ({"start": 10**400}, "take"),  # this very pid started at another time
    ],
)
def test_crafted_numbers_in_a_lease_do_not_crash_the_judge(
    crafted: dict[str, Any], action: str
) -> None:
    """Judged with the real process check (this process's pid by default):
    no OverflowError from os.kill or math."""
    me = Lease(open_backend("memory://lease-crafted"), "probe", 60.0)._place
    doc = _doc(host=me.host, boot=me.boot, pidns=me.pidns, timens=me.timens)
    doc.update(pid=os.getpid(), start=subtree.start_time(os.getpid()), heartbeat=time.time())
    doc.update(crafted)
    assert judge(doc, place=me, now=time.time(), default_ttl=60.0).action == action


@pytest.mark.parametrize("ttl", [math.inf, 1e400, 10**400, "inf", None, math.nan, True, -5])
def test_an_odd_ttl_in_a_lease_is_judged_as_a_finite_one(ttl: Any) -> None:
    """An older ckpt wrote "ttl": Infinity for --lease-timeout inf: its lease
    is judged like any other, never taken over as unreadable."""
    doc = _doc(host="node-b", ttl=ttl)
    assert _judge(doc)[0] == "refuse"
    v = judge(doc, place=HERE, now=NOW, default_ttl=60.0)
    assert math.isfinite(v.ttl) and v.ttl > 0


def test_sane_ttl() -> None:
    assert sane_ttl(math.inf) == sane_ttl(10**400) == MAX_TTL
    assert sane_ttl(math.nan) == sane_ttl("x") == sane_ttl(True) == 60.0
    assert sane_ttl(0) == 1.0 and sane_ttl(30) == 30.0


# ---------------------------------------------------------------- a contender


class Clock:
    """A monotonic clock that sleeping advances; `during` runs at each sleep
    (a holder beating, or not)."""

    def __init__(self) -> None:
        self.now = 50.0
        self.slept = 0.0
        self.during: list[Any] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds
        for f in self.during:
            f()


@pytest.fixture
def backend(tmp_path: Path) -> Backend:
    return open_backend(str(tmp_path / "r"))


def _write(backend: Backend, doc: dict[str, Any]) -> None:
    backend.write(LEASE_KEY, json.dumps(doc).encode())


def _owner(backend: Backend) -> str:
    return str(json.loads(backend.read(LEASE_KEY))["owner"])


def test_a_watched_lease_that_beats_is_refused(backend: Backend) -> None:
    """The contender's clock is 5 minutes ahead: the holder's lease looks
    stale, but it beats while watched, so it is live."""
    doc = _doc(host="node-b", heartbeat=time.time() - 300)
    _write(backend, doc)
    clock = Clock()

    def beat() -> None:
        if clock.slept > 10:
            doc["beat"] += 1
            _write(backend, doc)

    clock.during.append(beat)
    with pytest.raises(LeaseHeldError, match="changed while this run watched") as err:
        Lease(backend, "me", 60.0, clock=clock, sleep=clock.sleep).acquire()
    assert "node-b" in str(err.value) and "--lease-timeout" in str(err.value)
    assert clock.slept < 60, "refused once it changed, without watching the whole ttl"
    assert _owner(backend) == "run-x"


def test_a_watched_lease_is_watched_for_the_holders_ttl_not_the_contenders(
    backend: Backend,
) -> None:
    _write(backend, _doc(host="node-b", heartbeat=time.time() - 9000, ttl=600.0))
    clock = Clock()
    why = Lease(backend, "me", 5.0, clock=clock, sleep=clock.sleep).acquire()
    assert why is not None and "600s" in why
    assert clock.slept >= 600
    assert _owner(backend) == "me"


def test_a_lease_released_while_watched_is_created_anew(backend: Backend) -> None:
    _write(backend, _doc(host="node-b", heartbeat=time.time() - 300))
    clock = Clock()
    released: list[bool] = []

    def release() -> None:
        if clock.slept > 5 and not released:
            backend.delete(LEASE_KEY)
            released.append(True)

    clock.during.append(release)
    lease = Lease(backend, "me", 60.0, clock=clock, sleep=clock.sleep)
    assert lease.acquire() == "it was released"
    assert _owner(backend) == "me"


def test_a_lease_of_another_pid_namespace_naming_a_pid_dead_here_is_refused(
    backend: Backend, tmp_path: Path
) -> None:
    """The holder runs in another PID namespace of this host: its pid does
    not exist here, and that proves nothing."""
    me = Lease(backend, "probe", 60.0)._place
    dead = os.posix_spawn("/bin/true", ["true"], dict(os.environ))
    os.waitpid(dead, 0)
    doc = _doc(host=me.host, boot=me.boot, pidns="pid:[1]", timens=me.timens, pid=dead)
    doc["heartbeat"] = time.time()
    _write(backend, doc)
    with pytest.raises(LeaseHeldError, match="another PID namespace"):
        Lease(backend, "me", 60.0).acquire()
    assert _owner(backend) == "run-x"


def test_a_pid_that_is_another_process_now_is_taken_at_once(backend: Backend) -> None:
    """Same host, boot and namespaces; the pid runs, but started at another
    time than the holder did: the holder is gone."""
    me = Lease(backend, "probe", 60.0)._place
    start = subtree.start_time(os.getpid())
    assert start is not None
    doc = _doc(host=me.host, boot=me.boot, pidns=me.pidns, timens=me.timens)
    doc.update(pid=os.getpid(), start=start + 1, heartbeat=time.time())
    _write(backend, doc)
    why = Lease(backend, "me", 60.0).acquire()
    assert why is not None and "another process" in why
    doc["start"] = start  # the very process: live
    doc["owner"] = "run-y"
    _write(backend, doc)
    with pytest.raises(LeaseHeldError):
        Lease(backend, "me-too", 60.0).acquire()


def test_the_lease_written_is_strict_json_with_a_finite_ttl(backend: Backend) -> None:
    lease = Lease(backend, "me", math.inf)
    lease.acquire()
    lease.heartbeat()

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in lease.json")

    doc = json.loads(backend.read(LEASE_KEY), parse_constant=no_constants)
    assert doc["ttl"] == MAX_TTL and doc["interval"] == MAX_TTL / 4
    assert doc["beat"] == 2 and doc["pid"] == os.getpid()
    assert doc["start"] == subtree.start_time(os.getpid())
    assert doc["pidns"] == os.readlink("/proc/self/ns/pid")


# ---------------------------------------------------------------- watching across looks


def test_live_counts_a_stale_looking_lease_until_seen_unchanged_for_its_ttl(
    backend: Backend,
) -> None:
    """How rank 0 judges other ranks' leases between snapshots: never on the
    wall clock alone."""
    key = "ranks/1/lease.json"
    doc = _doc(host="node-b", heartbeat=time.time() - 3600, ttl=60.0)
    backend.write(key, json.dumps(doc).encode())
    clock = Clock()
    probe = Lease(backend, "", 60.0, key=key, clock=clock, sleep=clock.sleep)
    assert probe.live()
    clock.now += 59
    assert probe.live()
    doc["beat"] += 1  # it beat: seen afresh
    backend.write(key, json.dumps(doc).encode())
    clock.now += 30
    assert probe.live()
    clock.now += 59
    assert probe.live()
    clock.now += 2
    assert not probe.live()
    assert live_leases([probe]) == []


def test_live_leases_with_wait_watches_until_decided(backend: Backend) -> None:
    stale = "ranks/1/lease.json"
    beating = "ranks/2/lease.json"
    docs = {
        stale: _doc(host="node-b", heartbeat=time.time() - 3600, ttl=20.0),
        beating: _doc(host="node-c", heartbeat=time.time() - 3600, ttl=20.0, owner="r2"),
    }
    for key, doc in docs.items():
        backend.write(key, json.dumps(doc).encode())
    clock = Clock()

    def beat() -> None:
        docs[beating]["beat"] += 1
        backend.write(beating, json.dumps(docs[beating]).encode())

    clock.during.append(beat)
    probes = [Lease(backend, "", 60.0, key=k, clock=clock, sleep=clock.sleep) for k in docs]
    told: list[str] = []
    live = live_leases(probes, wait=True, on_wait=told.append)
    assert [p.key for p in live] == [beating]
    assert clock.slept >= 20 and len(told) == 1


# ---------------------------------------------------------------- the holder's heartbeat


class FlakyBackend:
    """Delegates to a real backend; the next `fail` writes of the lease raise `error`."""

    def __init__(self, inner: Backend, error: Exception, fail: int) -> None:
        self.inner = inner
        self.error = error
        self.fail = fail
        self.display = inner.display

    def write(self, key: str, data: bytes) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise self.error
        self.inner.write(key, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_heartbeat_thread_survives_any_error_and_says_so_once(backend: Backend) -> None:
    lease = Lease(backend, "me", 1.0)  # a beat every 0.25 s
    lease.acquire()
    flaky = FlakyBackend(backend, OverflowError("timeout value is too large"), fail=3)
    lease.backend = flaky  # type: ignore[assignment]
    said: list[str] = []
    with Heartbeat(lease, on_error=said.append) as beats:
        deadline = time.monotonic() + 30
        while json.loads(backend.read(LEASE_KEY))["beat"] < 3:
            assert time.monotonic() < deadline, "the heartbeat stopped beating"
            time.sleep(0.05)
        assert beats._thread.is_alive()
    assert said == ["lease heartbeat failed: timeout value is too large"]


def test_check_raises_once_the_lease_is_lost(backend: Backend) -> None:
    lease = Lease(backend, "me", 60.0)
    lease.acquire()
    lost: list[LeaseLostError] = []
    beats = Heartbeat(lease, on_lost=lost.append)
    beats.check()  # fresh: nothing asked
    _write(backend, _doc(owner="usurper"))
    beats._last = (time.monotonic() - 31, time.time() - 31)  # frozen past half the ttl
    with pytest.raises(LeaseLostError):
        beats.check()
    assert len(lost) == 1
    with pytest.raises(LeaseLostError):
        beats.check()
    assert _owner(backend) == "usurper"


def test_stop_joins_the_beat_so_a_release_is_final(backend: Backend) -> None:
    """No beat is under way once stop() returns: none can write the lease
    back after its release."""
    lease = Lease(backend, "me", 1.0)  # a beat every 0.25 s
    lease.acquire()
    with Heartbeat(lease) as beats:
        deadline = time.monotonic() + 30
        while json.loads(backend.read(LEASE_KEY))["beat"] < 3:
            assert time.monotonic() < deadline, "no beat"
            time.sleep(0.05)
    assert not beats._thread.is_alive()
    lease.release()
    time.sleep(0.5)  # two beats' time: a beat still running would write it back
    with pytest.raises(NotFound):
        backend.read(LEASE_KEY)
