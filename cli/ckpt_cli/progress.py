"""Which files of --dir are *in progress*, so that an automatic snapshot
waits for them, and which a commit refuses: the judgement the snapshotter
makes before it reads anything.

A file that changed since the last snapshot (the stat cache says which) is
judged on a descriptor of its own, opened once (`expect` keeps its size,
mtime and inode: the read that follows must find the same, or the file
changed again and keeps its previous version):
- held open for writing by a process of the job (`openfiles`), and not an
  appender by `openfiles.writer_kind`'s rule: in progress, "open for writing
  by pid N (python)". An appender is taken as its current prefix (the read
  accepts that it grows meanwhile) and not checked, unless only its bytes
  say it appends (a save in progress only grows too): then its check decides;
- failing its format check (`formats`, the user's --check commands first):
  in progress, "fails the zip check: no end-of-central-directory record";
- a directory with a changed path below it (or new) that fails its check
  (HF checkpoint-N/ without trainer_state.json, ...): in progress.
A file whose content is the one the last snapshot holds never holds a
snapshot back (waiting cannot change it); if that snapshot listed it as
unverified and it is still not whole, it is *carried*: listed again, so a
snapshot is called verified only if every file in it was whole when taken.
A commit (pinned) is judged by the checks alone, the files the script holds
open included: the script said "now".
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from ckpt_cli import openfiles
from ckpt_cli.formats import FdSource, Registry
from ckpt_cli.formats.checks import Verdict
from ckpt_cli.manifest import Entry, Manifest
from ckpt_cli.openfiles import OpenScan

#: How files are opened to be judged (as the snapshotter reads them).
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: Bytes compared at each end of what a look saw (writer_kind's rule 6).
LOOK_BYTES = 64 * 1024
#: Chunks of the last snapshot's version compared to prove an appender
#: (rule 4): every one up to this many, else the first, the last and an
#: even spread (a file rewritten in place changes its first or last chunk:
#: torch.save rewrites from the start and truncates first).
PREFIX_CHUNKS = 8


class Entryish(Protocol):
    @property
    def path(self) -> str: ...

    @property
    def type(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def mtime_ns(self) -> int: ...

    @property
    def ino(self) -> int: ...


Stat = tuple[int, int, int]  # size, mtime_ns, inode


@dataclasses.dataclass(frozen=True)
class Auto:
    """An automatic snapshot: how to see the job's open files, and whether to
    take it even with files in progress (the settle timeout ran out, or the
    job is over)."""

    open_scan: Callable[[], OpenScan] | None = None
    take_anyway: bool = False
    #: Only judge (the worker learns the appenders of a busy directory):
    #: nothing is read or written.
    probe: bool = False


@dataclasses.dataclass
class Judgement:
    #: path -> why, for files (and directories) in progress: they hold the
    #: snapshot back, or make it unverified when it is taken anyway.
    in_progress: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Unchanged since the last snapshot, which listed them as unverified,
    #: and still not whole: listed again, never waited for.
    carried: dict[str, str] = dataclasses.field(default_factory=dict)
    #: path -> the check it passed (files and directories).
    checks: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Appenders -> the size taken (the read takes that prefix).
    appenders: dict[str, int] = dataclasses.field(default_factory=dict)
    #: The stat each judged file had when judged: its read must find it.
    expect: dict[str, Stat] = dataclasses.field(default_factory=dict)
    #: Whether format checks ran (the built-in ones are on).
    checked: bool = False

    @property
    def unverified(self) -> dict[str, str]:
        return {**self.carried, **self.in_progress}

    def verified(self) -> bool | None:
        """A manifest's `verified`: False if anything is unverified, True if
        the checks ran, else None (not checked)."""
        if self.unverified:
            return False
        return True if self.checked else None


@dataclasses.dataclass(frozen=True)
class Look:
    """What a held-back snapshot saw of a file open for writing."""

    ino: int
    size: int
    head: str  # digest of [0, min(size, LOOK_BYTES))
    tail: str  # digest of [max(0, size - LOOK_BYTES), size)


class NotWholeError(RuntimeError):
    """A commit's file (or directory) fails its format check: the commit is
    not taken. A RuntimeError like snapshotter.TornCommitError."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"{path} {reason}: this commit is not taken (commit once the save is "
            "finished; --no-format-checks turns the built-in checks off)"
        )
        self.path = path
        self.reason = reason


def check_reason(verdict: Verdict) -> str:
    """How a failed verdict reads after a file name: 'fails the zip check:
    no end-of-central-directory record'."""
    name = verdict.check
    if name.startswith("command:"):
        return f"fails its --check {name[len('command:') :]}: {verdict.reason}"
    rest = verdict.reason
    if rest.startswith(f"{name}: "):
        rest = rest[len(name) + 2 :]
    return f"fails the {name} check: {rest}" if rest else f"fails the {name} check"


def changed_paths(
    local: Iterable[Entryish], to_read: Iterable[str], parent: Manifest | None
) -> set[str]:
    """Paths added, modified or removed since `parent` (files to read, and
    entries the parent does not have or that are gone)."""
    before = {e.path for e in parent.entries} if parent else set()
    now = {e.path for e in local}
    return set(to_read) | (now - before) | (before - now)


def touched(directory: str, changed: Iterable[str]) -> bool:
    prefix = directory + "/"
    return any(p == directory or p.startswith(prefix) for p in changed)


def _same_stat(le: Entryish, e: Entry | None) -> bool:
    return (
        e is not None
        and e.type == "file"
        and (le.size, le.mtime_ns, le.ino) == (e.size, e.mtime_ns, e.ino)
    )


class Judge:
    """Judges files for the snapshotter: the checks in force (`registry`),
    how it hashes (a chunk's digest, for comparing with a snapshot's chunks)."""

    def __init__(
        self,
        registry: Registry,
        root: Path,
        *,
        hash: Callable[[bytes | memoryview], str],
        chunk_size: int,
    ) -> None:
        self.registry = registry
        self.root = root
        self._root = os.fspath(root)
        self.hash = hash
        self.chunk_size = chunk_size
        #: Open files with no earlier version, as the last judgement saw them
        #: (writer_kind's rule 6).
        self.looks: dict[str, Look] = {}

    @property
    def checked(self) -> bool:
        return self.registry.builtin

    # -- automatic snapshots

    def judge(
        self,
        local: Sequence[Entryish],
        to_read: Sequence[Entryish],
        parent: Manifest | None,
        auto: Auto,
    ) -> Judgement:
        out = Judgement(checked=self.checked)
        before = {e.path: e for e in parent.entries} if parent else {}
        listed = dict(parent.unverified) if parent is not None and parent.verified is False else {}
        # Changed: not what the last snapshot holds. A file the stat cache
        # does not vouch for (written within a second of a scan, or never
        # read since it was held back) may still have the parent's stat.
        changed_files = [le for le in to_read if not _same_stat(le, before.get(le.path))]
        reading = {le.path for le in changed_files}
        again = [le for le in local if le.path in listed and le.path not in reading]
        files = [le for le in (*changed_files, *again) if le.type == "file"]
        scan = auto.open_scan() if files and auto.open_scan is not None else None
        looks: dict[str, Look] = {}
        for le in files:
            prev = before.get(le.path)
            self._judge_file(le, prev if prev and prev.type == "file" else None, scan, out, looks)
        self.looks = looks
        changed = changed_paths(local, reading, parent)
        for rel, verdict in self.registry.check_tree(local, changed=changed).items():
            if verdict.ok:
                out.checks[rel] = verdict.check
            elif touched(rel, changed) or rel in listed:
                out.in_progress[rel] = check_reason(verdict)
        for rel in list(out.in_progress):
            if rel in listed and not touched(rel, changed):
                out.carried[rel] = out.in_progress.pop(rel)
        return out

    def _judge_file(
        self,
        le: Entryish,
        prev: Entry | None,
        scan: OpenScan | None,
        out: Judgement,
        looks: dict[str, Look],
    ) -> None:
        path = f"{self._root}/{le.path}"  # (no pathlib: ~40% of the cost per small file)
        try:
            fd = os.open(path, OPEN_FLAGS)
        except OSError:
            return  # gone, or unreadable: the read says which
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return
            size = st.st_size
            out.expect[le.path] = (size, st.st_mtime_ns, st.st_ino)
            flags = scan.flags(le.path) if scan is not None else None
            prev_size = prev.size if prev is not None else None
            kind = openfiles.writer_kind(
                le.path, flags, size=size, prev_size=prev_size, prefix_unchanged=None
            )
            if flags is not None and not kind.appender:
                prefix = None
                if prev is not None and size >= prev.size:
                    prefix = self._prefix_same(fd, prev)
                since = None
                if prefix is None:  # no earlier version to compare: compare looks
                    since = self._since_look(fd, le.path, st)
                    looks[le.path] = self._look(fd, st)
                kind = openfiles.writer_kind(
                    le.path,
                    flags,
                    size=size,
                    prev_size=prev_size,
                    prefix_unchanged=prefix,
                    since_look=since,
                )
                if not kind.appender:
                    assert scan is not None
                    holders = openfiles.describe_holders(scan.files.get(le.path, ()))
                    out.in_progress[le.path] = f"open for writing by {holders}"
                    return
            if kind.appender and not kind.checked:
                out.appenders[le.path] = size
                return
            verdict = self._check(path, le.path, fd, size)
            if verdict.ok is False:
                out.in_progress[le.path] = check_reason(verdict)
                return
            if verdict.ok:
                out.checks[le.path] = verdict.check
            if kind.appender:
                out.appenders[le.path] = size
        finally:
            os.close(fd)

    def _check(self, path: str, rel: str, fd: int, size: int) -> Verdict:
        """Registry.check_file on a descriptor already judged a regular file."""
        command = self.registry.command_for(rel)
        if command is not None:
            return command.run(path, rel=rel, fd=fd)
        return self.registry.check_source(rel, FdSource(fd, size))

    def _read(self, fd: int, offset: int, length: int) -> bytes:
        parts = []
        while length > 0:
            got = os.pread(fd, length, offset)
            if not got:
                break
            parts.append(got)
            offset += len(got)
            length -= len(got)
        return b"".join(parts)

    def _prefix_same(self, fd: int, prev: Entry) -> bool | None:
        """Are the bytes of the last snapshot's version (prev) still the
        file's first bytes? Compares chunk digests: every full chunk up to
        PREFIX_CHUNKS, else a spread of them, and the partial last one."""
        cs = self.chunk_size
        full = prev.size // cs
        if len(prev.chunks) != full + (1 if prev.size % cs else 0):
            return None
        if full <= PREFIX_CHUNKS:
            picks = list(range(full))
        else:
            step = (full - 1) / (PREFIX_CHUNKS - 1)
            picks = sorted({round(i * step) for i in range(PREFIX_CHUNKS)})
        order = ([full] if prev.size % cs else []) + picks  # the end first: cheap and telling
        for i in order:
            length = min(cs, prev.size - i * cs)
            data = self._read(fd, i * cs, length)
            if len(data) != length or self.hash(data) != prev.chunks[i]:
                return False
        return True

    def _look(self, fd: int, st: os.stat_result) -> Look:
        size = st.st_size
        head = self._read(fd, 0, min(size, LOOK_BYTES))
        tail_at = max(0, size - LOOK_BYTES)
        tail = self._read(fd, tail_at, size - tail_at)
        return Look(st.st_ino, size, self.hash(head), self.hash(tail))

    def _since_look(self, fd: int, rel: str, st: os.stat_result) -> bool | None:
        """Rule 6: did the file only grow since the last look, the bytes it
        saw then unchanged? None if there was no look of this inode."""
        look = self.looks.get(rel)
        if look is None or look.ino != st.st_ino:
            return None
        if st.st_size < look.size:
            return False
        if st.st_size == look.size:
            return None  # nothing written since: no evidence either way
        head = self._read(fd, 0, min(look.size, LOOK_BYTES))
        tail_at = max(0, look.size - LOOK_BYTES)
        tail = self._read(fd, tail_at, look.size - tail_at)
        return self.hash(head) == look.head and self.hash(tail) == look.tail

    # -- commits

    def check_pinned(
        self,
        entries: Sequence[Entryish],
        fds: Mapping[str, tuple[int, os.stat_result]],
        changed_files: Iterable[str],
        parent: Manifest | None,
    ) -> dict[str, str]:
        """The checks of a commit, on its pinned descriptors: each changed
        file (and each the last snapshot listed as unverified), and the
        directories; the check each passed, or NotWholeError for the first
        that fails."""
        listed = dict(parent.unverified) if parent is not None and parent.verified is False else {}
        reading = set(changed_files)
        checks: dict[str, str] = {}
        for rel in sorted(reading | (set(listed) & set(fds))):
            pinned = fds.get(rel)
            if pinned is None:
                continue
            fd, st = pinned
            verdict = self.registry.check_file(self.root / rel, rel=rel, fd=fd, size=st.st_size)
            if verdict.ok is False:
                raise NotWholeError(rel, check_reason(verdict))
            if verdict.ok:
                checks[rel] = verdict.check
        changed = changed_paths(entries, reading, parent)
        for rel, verdict in self.registry.check_tree(entries, changed=changed).items():
            if verdict.ok:
                checks[rel] = verdict.check
            elif touched(rel, changed) or rel in listed:
                raise NotWholeError(f"{rel}/", check_reason(verdict))
        return checks
