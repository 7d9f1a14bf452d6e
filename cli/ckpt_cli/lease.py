"""The single-writer lease: lease.json with owner, host, pid, boot id and a
heartbeat. One `ckpt run` or `ckpt push` writes to a remote at a time; readers
need no lease. Imports: standard library, `remote`, `errors`, `manifest`, `subtree`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any

from ckpt_cli import subtree
from ckpt_cli.errors import LeaseHeldError, RemoteError
from ckpt_cli.manifest import host_name
from ckpt_cli.remote import Backend, NotFound

LEASE_KEY = "lease.json"


class LeaseLostError(RemoteError):
    """Another writer took the lease over: this one must stop writing."""


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


class Lease:
    """The single-writer lease: lease.json with owner, host, pid, boot id and a
    heartbeat. Stale when the heartbeat is older than its ttl, or at once when
    it names a dead pid on this same host and boot."""

    def __init__(self, backend: Backend, owner: str, ttl: float, *, key: str = LEASE_KEY) -> None:
        #: lease.json, or ranks/<r>/lease.json: one lease per rank's stream.
        self.key = key
        self.backend = backend
        stream = key.rsplit("/", 1)[0] if "/" in key else ""
        #: What error messages name: the remote, and the rank for a rank's lease.
        rank = stream.replace("ranks/", "rank ")
        self.where = f"{backend.display} ({rank})" if stream else backend.display
        self.owner = owner
        self.ttl = ttl
        self.held = False

    def _doc(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "owner": self.owner,
                "host": host_name(),
                "pid": os.getpid(),
                "boot": boot_id(),
                "heartbeat": now,
                "ttl": self.ttl,
            }
        ).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.backend.read(self.key))
        except NotFound:
            return None
        except ValueError:
            return {}  # garbage: treated as stale
        return doc if isinstance(doc, dict) else {}

    def describe_stale(self, doc: dict[str, Any]) -> str | None:
        """Why the lease in doc may be taken over, or None if it is live."""
        if not doc or "owner" not in doc:
            return "it is unreadable"
        try:
            age = time.time() - float(doc.get("heartbeat", 0))
            ttl = float(doc.get("ttl", self.ttl))
        except (TypeError, ValueError):
            return "it is unreadable"
        if not (math.isfinite(age) and math.isfinite(ttl)):
            return "it is unreadable"  # NaN or infinity: it would never expire
        if age > ttl:
            return f"its last heartbeat is {age:.0f}s old (timeout {ttl:.0f}s)"
        if doc.get("host") == host_name() and doc.get("boot", "") == boot_id():
            pid = doc.get("pid")
            if isinstance(pid, int) and not subtree.pid_alive(pid):
                return f"its process {pid} on this host is gone"
        if doc.get("host") == host_name() and doc.get("boot") and doc.get("boot") != boot_id():
            return "this host rebooted since"
        return None

    def acquire(self) -> str | None:
        """Take the lease or raise LeaseHeldError; returns why an old one was taken over."""
        backend = self.backend
        # A create that cannot race (a local directory: a hard link, or O_EXCL)
        # needs no confirmation; a check-then-put or a takeover (an overwrite)
        # does.
        confirm = True
        if backend.create_exclusive(self.key, self._doc()):
            took_over = None
            confirm = not getattr(backend, "exclusive_create", False)
        else:
            doc = self._read()
            if doc is not None and doc.get("owner") == self.owner:
                took_over = None
            else:
                why = self.describe_stale(doc or {}) if doc is not None else "it was released"
                if why is None:
                    assert doc is not None
                    age = time.time() - float(doc.get("heartbeat", 0))
                    raise LeaseHeldError(
                        f"remote {self.where} is in use by ckpt on host "
                        f"{doc.get('host')} (pid {doc.get('pid')}, heartbeat {age:.0f}s ago); "
                        f"stop that run, or wait: a lease without heartbeat for "
                        f"{float(doc.get('ttl', self.ttl)):.0f}s is taken over (--lease-timeout)"
                    )
                backend.write(self.key, self._doc())
                took_over = why
        if confirm:  # wait out a racing writer's put, then see whose lease it is
            time.sleep(0.05)
            doc = self._read()
        else:
            doc = {"owner": self.owner}
        if not doc or doc.get("owner") != self.owner:
            raise LeaseHeldError(
                f"remote {self.where} was claimed by another ckpt at the same moment; "
                "only one writer may use a remote"
            )
        self.held = True
        return took_over

    def heartbeat(self) -> None:
        """Refresh; LeaseLostError if another writer owns the lease now."""
        doc = self._read()
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
            doc = self._read()
            if doc is not None and doc.get("owner") == self.owner:
                self.backend.delete(self.key)
