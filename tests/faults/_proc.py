"""Shared helpers of the fault-injection suite (tests only; no product code).

- Self-verifying file contents: `content(seed, name, version, size)` builds the
  bytes a child writes; a fixed-size header names the file, its version and the
  sha256 of the rest, and every BLOCK-aligned block starts with a tag naming
  file, version and offset. So a whole file proves itself (`verify_whole`), a
  chunk (8 MiB is a multiple of BLOCK) tells whose it is (`owner`), and a torn
  file shows which versions it mixes (`describe`). `PRELUDE` is the same code
  as source text, pasted into child scripts (standard library only).
- `RemoteView`: read-only listing of a remote's objects (a path, or an S3 store
  through fsspec), used to classify where a kill landed from evidence.
- Seeds: `base_seed()` (env CKPT_FAULT_SEED, else random) and `repro()` for
  assertion messages, so any failure can be rerun with the same choices.
- Process helpers: reading the JSON a child announces itself with, waiting for
  pids to be gone, running several `ckpt` readers at once.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import random
import re
import subprocess
from pathlib import Path
from typing import Any

from integration._util import CKPT, pid_gone, wait_for

#: Every block of a file starts with a tag (block 0: after the header).
BLOCK = 64 * 1024
#: The header of a file: "CKPTFAULT name v<version> size=<n> sha256=<hex of the rest>".
HEADER = 160
#: ckpt's chunk size (ckpt.json); a multiple of BLOCK, so chunks start with a tag.
CHUNK = 8 * 1024 * 1024

SEED_ENV = "CKPT_FAULT_SEED"


def content(seed: str, name: str, version: int, size: int) -> bytes:
    """The bytes of file `name` at `version` (deterministic; size >= HEADER)."""
    import hashlib
    import random

    base = random.Random(f"{seed}/{name}/{version}").randbytes(2 * BLOCK)
    body = bytearray(size)
    for off in range(0, size, BLOCK):
        tag = f"<{name} v{version} @{off}>".encode()
        start = HEADER if off == 0 else off
        end = min(size, off + BLOCK)
        rot = (off // BLOCK) % BLOCK
        fill = tag + base[rot : rot + (end - start) - len(tag)]
        body[start:end] = fill[: end - start]
    digest = hashlib.sha256(body[HEADER:]).hexdigest()
    head = f"CKPTFAULT {name} v{version} size={size} sha256={digest}".encode()
    body[:HEADER] = head.ljust(HEADER - 1) + b"\n"
    return bytes(body)


def parse_header(data: bytes) -> tuple[str, int, int, str] | None:
    """(name, version, size, sha256) from a file's first HEADER bytes, or None."""
    import re

    m = re.match(rb"CKPTFAULT (\S+) v(\d+) size=(\d+) sha256=([0-9a-f]{64}) *\n", data[:HEADER])
    if m is None:
        return None
    return m.group(1).decode(), int(m.group(2)), int(m.group(3)), m.group(4).decode()


def verify_whole(data: bytes) -> tuple[str, int]:
    """(name, version) of a whole file; ValueError saying how it is torn."""
    import hashlib

    head = parse_header(data)
    if head is None:
        raise ValueError(f"no valid header ({len(data)} bytes, starts {data[:40]!r})")
    name, version, size, digest = head
    if len(data) != size:
        raise ValueError(f"{name} v{version}: {len(data)} bytes, the header says {size}")
    if hashlib.sha256(data[HEADER:]).hexdigest() != digest:
        raise ValueError(f"{name} v{version}: the body does not match the header's sha256")
    return name, version


#: The code above as text, for child scripts: `exec`-free, pasted as is.
PRELUDE = (
    f"BLOCK = {BLOCK}\nHEADER = {HEADER}\n\n"
    + "\n\n".join(inspect.getsource(f) for f in (content, parse_header, verify_whole))
    + "\n"
)

_TAG = re.compile(rb"<(\S+) v(\d+) @(\d+)>")


def owner(head: bytes) -> tuple[str, int] | None:
    """Whose chunk (or file prefix) this is, from its first bytes: (name, version)."""
    parsed = parse_header(head)
    if parsed is not None:
        return parsed[0], parsed[1]
    m = _TAG.match(head)
    return (m.group(1).decode(), int(m.group(2))) if m else None


def describe(data: bytes) -> str:
    """What a (possibly torn) file holds, block by block: for assertion messages."""
    runs: list[str] = []
    last = None
    for off in range(0, len(data), BLOCK):
        start = HEADER if off == 0 else off
        who = parse_header(data) if off == 0 else None
        m = _TAG.match(data, start)
        here = f"v{who[1]}" if who else (f"v{int(m.group(2))}" if m else "?")
        if here != last:
            runs.append(f"{here}@{off}")
            last = here
    return f"{len(data)} bytes: " + ", ".join(runs[:12]) + (" ..." if len(runs) > 12 else "")


# ---------------------------------------------------------------- seeds


def base_seed() -> int:
    """CKPT_FAULT_SEED if set (to replay a failure), else a fresh random seed."""
    raw = os.environ.get(SEED_ENV)
    return int(raw) if raw else random.SystemRandom().randrange(1 << 32)


def repro(seed: int, **where: object) -> str:
    """A suffix for assertion messages: how to replay the same random choices."""
    extra = "".join(f" {k}={v}" for k, v in where.items())
    return f" [{SEED_ENV}={seed}{extra}]"


# ---------------------------------------------------------------- the remote


_LOCAL_TEMP = re.compile(r"^\.[^/]*\.tmp-[0-9a-f]+$")
_MANIFEST = re.compile(r"^snapshots/(\d{10})-([0-9a-f]{8})\.json$")


class RemoteView:
    """A read-only view of a repository's objects: a local path, or an fsspec
    URL (S3 on the test server) with its storage options."""

    def __init__(self, where: Path | str, storage_options: dict[str, Any] | None = None) -> None:
        self.path = where if isinstance(where, Path) else None
        self._fs: Any = None
        self._root = ""
        if self.path is None:
            import fsspec

            self._fs, self._root = fsspec.core.url_to_fs(str(where), **(storage_options or {}))

    def keys(self) -> dict[str, int]:
        """Every object (relative key -> size), temp names of half-written
        local objects included (their names start with a dot)."""
        if self.path is not None:
            out: dict[str, int] = {}
            for dirpath, _dirs, files in os.walk(self.path):
                rel = Path(dirpath).relative_to(self.path)
                for name in files:
                    with contextlib.suppress(FileNotFoundError):
                        out[(rel / name).as_posix()] = (Path(dirpath) / name).stat().st_size
            return out
        self._fs.invalidate_cache()
        found = self._fs.find(self._root, detail=True)
        strip = self._root.rstrip("/") + "/"
        return {k[len(strip) :]: int(v.get("size") or 0) for k, v in found.items()}

    def read(self, key: str, length: int | None = None) -> bytes:
        if self.path is not None:
            with open(self.path / key, "rb") as f:
                return f.read() if length is None else f.read(length)
        full = f"{self._root.rstrip('/')}/{key}"
        if length is None:
            data: bytes = self._fs.cat_file(full)
        else:
            data = self._fs.cat_file(full, start=0, end=length)
        return data

    def state(self) -> RemoteState:
        """What the remote holds now: manifests (parsed), chunks, temp objects."""
        manifests: dict[str, dict[str, Any]] = {}
        chunks: set[str] = set()
        temps: list[str] = []
        for key in self.keys():
            base = key.rsplit("/", 1)[-1]
            if _LOCAL_TEMP.match(base):
                temps.append(key)
            elif _MANIFEST.match(key):
                with contextlib.suppress(FileNotFoundError, ValueError):
                    manifests[key] = json.loads(self.read(key))
            elif key.startswith("chunks/"):
                chunks.add(base)
        return RemoteState(manifests, chunks, temps)

    def chunk_owner(self, digest: str) -> tuple[str, int] | None:
        try:
            return owner(self.read(f"chunks/{digest[:2]}/{digest}", HEADER))
        except FileNotFoundError:
            return None


class RemoteState:
    """A listing of the remote at one moment."""

    def __init__(
        self, manifests: dict[str, dict[str, Any]], chunks: set[str], temps: list[str]
    ) -> None:
        self.manifests = manifests
        self.chunks = chunks
        self.temps = temps

    def referenced(self) -> set[str]:
        return {
            c for m in self.manifests.values() for e in m["entries"] for c in e.get("chunks", ())
        }

    def orphans(self) -> set[str]:
        return self.chunks - self.referenced()

    def newest(self) -> dict[str, Any] | None:
        if not self.manifests:
            return None
        return self.manifests[max(self.manifests)]  # keys sort by generation


# ---------------------------------------------------------------- processes


def read_announce(path: Path, *, what: str, proc: Any = None) -> dict[str, Any]:
    """Wait for the JSON a child writes (atomically) to announce itself."""
    wait_for(path.exists, what=what, proc=proc)
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def wait_gone(pids: list[int], *, what: str, timeout: float = 30.0) -> None:
    """Poll until every pid is gone (absent or a zombie)."""
    wait_for(
        lambda: all(pid_gone(p) for p in pids),
        what=f"{what} (pids {pids}) to be gone",
        timeout=timeout,
    )


def run_together(
    commands: list[list[str]], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 90
) -> list[subprocess.CompletedProcess[str]]:
    """Run several `ckpt` commands at once (readers, say) and wait for all."""
    full_env = {**os.environ, **(env or {})}
    procs = [
        subprocess.Popen(
            [str(CKPT), *args],
            cwd=cwd,
            env=full_env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        for args in commands
    ]
    results = []
    try:
        for args, p in zip(commands, procs, strict=True):
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess([str(CKPT), *args], p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results
