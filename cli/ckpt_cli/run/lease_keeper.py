"""The lease keeper: holds the repository's lease for the run (acquire, a
heartbeat while it is held, release), and remembers its loss: from then on
no snapshot is written (`check`, before every manifest)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ckpt_cli import console
from ckpt_cli.lease import Heartbeat, LeaseLostError
from ckpt_cli.repository import Repository


class LeaseKeeper:
    def __init__(self) -> None:
        self.error: LeaseLostError | None = None  # the heartbeat found the lease taken
        self._beats: Heartbeat | None = None

    @contextlib.contextmanager
    def held(self, repo: Repository, owner: str, ttl: float) -> Iterator[None]:
        """Acquire the lease, beat while the body runs, release it after."""
        lease = repo.lease(owner, ttl)
        took_over = lease.acquire(on_wait=console.info)
        if took_over:
            console.warn(f"took over the lease on {repo.display}: {took_over}")
        # Beating from here on: a restore may take longer than the ttl.
        self._beats = Heartbeat(lease, on_lost=self.lost, on_error=console.warn)
        try:
            with self._beats:
                yield
        finally:
            lease.release()

    def lost(self, exc: LeaseLostError) -> None:
        """(The heartbeat's thread.) The lease was taken: no more snapshots."""
        self.error = exc
        console.error(str(exc))

    def check(self) -> None:
        """Before a manifest is written (Heartbeat.check): never over a newer
        writer's state, also after this run was frozen."""
        if self.error is not None:
            raise self.error
        if self._beats is not None:
            self._beats.check()
