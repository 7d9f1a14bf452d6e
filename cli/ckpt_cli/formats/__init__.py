"""Is a checkpoint file, or directory, one whole version? The registry of
format checks and the API the snapshotter, the worker and `ckpt verify` call.

A check reads headers and trailers only: a few KiB at the start and the
end, plus a zip's central directory, a safetensors or npy header, a legacy
torch file's pickles, each under a cap, never the data (`formats.checks`,
`formats.pickles` and `formats.dirs` say exactly what each verifies). A file is
recognised by its content first (a `model.bin` that is a zip is checked as a
zip), then by its name (a 5-byte `.safetensors` is a truncated one; `.bin`
is not such a name: raw data is called so too); a file of no known format
passes as unrecognised, never fails. Formats: zip
(torch.save, Lightning .ckpt, Keras .keras, .npz), torch legacy, safetensors,
npy, HDF5 (.h5, Keras 2, h5py), pickle (joblib), JSON; directories: HF
Trainer checkpoint-N/, torch.distributed.checkpoint, orbax steps.

API. Every call returns a `Verdict`: ok True = whole; False = not whole (in
progress or torn), `reason` names the format and why; None = no check
applies (unrecognised, or over a cap: `reason` says). `check` names the
check that decided ("zip", "hf-trainer", "command:*.msgpack"): what a
manifest records per file.

    registry = Registry([CommandCheck.parse("*.msgpack=my-verify")])
    registry.check_file(root / rel, rel=rel, fd=pinned_fd, size=pinned_size)
    registry.check_source(rel, source)    # any Source (verify: stored chunks)
    registry.check_tree(scan_entries, changed=paths_changed_since_last_snapshot)
    check_file(path), check_tree(entries) # the built-in registry, DEFAULT

- check_file reads through `fd` when given (the snapshotter's pin: os.pread,
  the descriptor's offset is untouched) and checks its first `size` bytes
  (the pinned stat's size), else opens `path`. `rel`, the path relative to
  --dir (default: the file's name), is what user globs and suffixes match.
  Call it for the files that changed since the last snapshot (the stat
  cache says which): a few preads each. CPU per file: ~65 us for a small
  torch zip (9 entries), ~0.5 ms for one of 256 tensors (its central
  directory, 24 KB, is most of it), ~140 us for a small legacy torch file,
  ~25 us for HDF5 (open and close included; 2 cores at load ~12).
- check_source runs the built-in checks only (a command needs a file):
  `ckpt verify` passes a Source whose read() fetches just the chunks that
  cover the asked range (a zip's end and directory, a safetensors header).
- check_tree takes the scan (anything with `.path` and `.type`, e.g.
  snapshotter.LocalEntry) and returns a verdict per recognised directory.
  `changed` lets it see a save in progress over an older checkpoint.

User checks, for formats of one's own. The CLI shape (wired by the CLI;
this module parses and runs them):

    ckpt run --check '*.msgpack=python -m mypkg.verify' --check-timeout 60 ...
    # ckpt.toml
    check_timeout = 60
    [checks]
    "*.msgpack" = "python -m mypkg.verify"
    "shards/*.bin" = ["my-verify", "--strict", "{}"]

--check is repeatable (CommandCheck.parse); each [checks] key is a glob and
its value a command line or an argv list (CommandCheck.of). A glob without
"/" matches the file name, one with "/" the path relative to --dir; the
first matching check replaces the built-in one for that file. The command
gets the file as its last argument, or wherever "{}" appears: with a pinned
descriptor that is /dev/fd/N (the pinned inode itself, inherited), and
CKPT_CHECK_FILE holds the relative path. Exit 0 = whole; another exit, or
no exit within the timeout (its process group is then killed) = not whole.
The program must exist when the check is parsed (ConfigError otherwise).
`Registry(builtin=False)` turns the built-in checks off (for a flag such as
--no-format-checks); user checks still run.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shlex
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ckpt_cli.errors import ConfigError
from ckpt_cli.formats import checks as fc
from ckpt_cli.formats import pickles as fp
from ckpt_cli.formats.checks import UNRECOGNISED, Source, Torn, Unchecked, Verdict
from ckpt_cli.formats.dirs import check_dir

#: Bytes read at the start and at the end of a file, once; most checks need
#: nothing else.
HEAD = 4096
TAIL = 4096
DEFAULT_TIMEOUT = 60.0


class FdSource:
    """The first `size` bytes of an open file, read with os.pread."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self._size = size
        self.bytes_read = 0

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self._size - offset))
        parts: list[bytes] = []
        while length > 0:
            data = os.pread(self.fd, length, offset)
            if not data:
                break  # shrank since: the check sees it short
            parts.append(data)
            offset += len(data)
            length -= len(data)
            self.bytes_read += len(data)
        return b"".join(parts)


class BytesSource:
    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + max(0, length)]


class _Cached:
    """A Source whose first HEAD and last TAIL bytes are read once."""

    def __init__(self, src: Source) -> None:
        self.src = src
        self._size = src.size
        self.head = src.read(0, min(HEAD, self._size))
        self.tail_at = max(len(self.head), self._size - TAIL)
        self.tail = src.read(self.tail_at, self._size - self.tail_at)

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + max(0, length), self._size)
        if end <= len(self.head):
            return self.head[offset:end]
        if offset >= self.tail_at:
            return self.tail[offset - self.tail_at : end - self.tail_at]
        return self.src.read(offset, end - offset)


@dataclass(frozen=True)
class Format:
    name: str
    check: fc.Check
    suffixes: tuple[str, ...]
    #: The content is this format (from the first HEAD bytes and the name).
    sniff: Callable[[bytes, str], bool]
    #: A file this short could be this format cut inside its magic.
    cut_magic: Callable[[bytes], bool]
    #: Checked on its suffix alone (no magic at 0: JSON; HDF5's user block).
    by_suffix: bool = False
    #: Exact file names of this format.
    names: tuple[str, ...] = ()

    def run(self, src: Source) -> Verdict:
        try:
            self.check(src)
        except Torn as e:
            return Verdict(False, self.name, f"{self.name}: {e}")
        except Unchecked as e:
            return Verdict(None, self.name, f"{self.name}: not checked: {e}")
        except OSError as e:
            return Verdict(None, self.name, f"{self.name}: not checked: read failed ({e.strerror})")
        return Verdict(True, self.name)


def _fixed(magic: bytes) -> Callable[[bytes], bool]:
    return lambda head: len(head) < len(magic) and magic.startswith(head)


def _is_safetensors(head: bytes, _name: str) -> bool:
    if len(head) < 10 or head[8:10] not in (b'{"', b"{}"):
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= fc.SAFETENSORS_HEADER_CAP


def _is_pickle(head: bytes, name: str) -> bool:
    """Protocol 2+; framed (4+) pickles anywhere, 2/3 under a pickle suffix."""
    if len(head) < 3 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        return False
    return (head[1] >= 4 and head[2] == 0x95) or name.endswith(PICKLE_SUFFIXES)


PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")
#: Containers of items at offsets another file lists: torch.distributed
#: .distcp files start with an item torch.save wrote (a zip) and go on with
#: raw tensor bytes. Never checked by content; their directory is.
OPAQUE_SUFFIXES = (".distcp",)

FORMATS: tuple[Format, ...] = (
    Format(
        "zip",
        fc.check_zip,
        (".pt", ".pth", ".ckpt", ".keras", ".npz", ".zip"),
        lambda h, _n: h[:4] in (fc.ZIP_LOCAL, fc.ZIP_END),
        _fixed(fc.ZIP_LOCAL),
    ),
    Format(
        "torch-legacy",
        fp.check_torch_legacy,
        (".pt", ".pth"),
        lambda h, _n: fp.is_torch_legacy(h),
        _fixed(fp.TORCH_LEGACY_HEAD),
    ),
    Format(
        "safetensors",
        fc.check_safetensors,
        (".safetensors",),
        _is_safetensors,
        lambda h: len(h) < 10 and (len(h) <= 8 or h[8:9] == b"{"),
    ),
    Format(
        "npy", fc.check_npy, (".npy",), lambda h, _n: h[:6] == fc.NPY_MAGIC, _fixed(fc.NPY_MAGIC)
    ),
    Format(
        "hdf5",
        fc.check_hdf5,
        (".h5", ".hdf5", ".he5"),  # not .hdf: HDF4 too
        lambda h, _n: h[:8] == fc.HDF5_MAGIC,
        _fixed(fc.HDF5_MAGIC),
        by_suffix=True,
    ),
    Format(
        "pickle",
        fp.check_pickle,
        PICKLE_SUFFIXES,
        _is_pickle,
        lambda h: len(h) < 3 and h[:1] in (b"", b"\x80") and (len(h) < 2 or 2 <= h[1] <= 5),
    ),
    Format(
        "json",
        fc.check_json,
        (".json",),
        lambda _h, _n: False,
        lambda _h: False,
        by_suffix=True,
        names=("_CHECKPOINT_METADATA",),  # orbax's step metadata
    ),
)


def choose(name: str, head: bytes) -> Callable[[Source], Verdict] | None:
    """How to check a file (name: its base name; head: its first bytes, all
    of them if fewer than HEAD): as the format of its exact name, of its
    content, else of its suffix; None when no check applies. A file shorter
    than the magic number its suffix promises fails without a read."""
    lower = name.lower()
    if lower.endswith(OPAQUE_SUFFIXES):
        return None
    chosen = next((f for f in FORMATS if name in f.names), None)
    chosen = chosen or next((f for f in FORMATS if f.sniff(head, lower)), None)
    expected = [f for f in FORMATS if lower.endswith(f.suffixes)]
    chosen = chosen or next((f for f in expected if f.by_suffix), None)
    if chosen is not None:
        return chosen.run
    cut = [f.name for f in expected if f.cut_magic(head)]
    if not cut:
        return None
    verdict = Verdict(
        False, cut[0], f"{' or '.join(cut)}: {len(head)} bytes, cut inside the magic number"
    )
    return lambda _src: verdict


def _printable(text: str, limit: int = 200) -> str:
    """One line with no control characters (outside text: a command's stderr)."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class CommandCheck:
    """A user's check: files matching `glob` are whole when `argv` exits 0."""

    glob: str
    argv: tuple[str, ...]
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def parse(
        cls, spec: str, *, timeout: float = DEFAULT_TIMEOUT, flag: str = "--check"
    ) -> CommandCheck:
        """'GLOB=COMMAND' (the flag's form); ConfigError naming the flag."""
        glob, sep, command = spec.partition("=")
        if not sep or not glob.strip() or not command.strip():
            raise ConfigError(
                f"{flag} {_printable(repr(spec))}: expected GLOB=COMMAND, "
                f"e.g. {flag} '*.msgpack=python -m mypkg.verify'"
            )
        return cls.of(glob.strip(), command, timeout=timeout, flag=flag)

    @classmethod
    def of(
        cls,
        glob: str,
        command: str | Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        flag: str = "[checks]",
    ) -> CommandCheck:
        """A check from a glob and a command line or argv list (ckpt.toml's
        [checks] table); the program must be found now."""
        where = f"{flag} {_printable(repr(glob))}"
        try:
            argv = tuple(shlex.split(command)) if isinstance(command, str) else tuple(command)
        except ValueError as e:
            raise ConfigError(f"{where}: the command does not parse ({e})") from None
        if not argv or not all(isinstance(a, str) and a for a in argv):
            raise ConfigError(f"{where}: the command is empty")
        if shutil.which(argv[0]) is None:
            raise ConfigError(f"{where}: {_printable(argv[0])}: command not found")
        if not timeout > 0:
            raise ConfigError(f"{where}: the check timeout must be above 0 (--check-timeout)")
        return cls(glob, argv, timeout)

    @property
    def name(self) -> str:
        return f"command:{self.glob}"

    def matches(self, rel: str) -> bool:
        target = rel if "/" in self.glob else rel.rsplit("/", 1)[-1]
        return fnmatch.fnmatchcase(target, self.glob)

    def argv_for(self, arg: str) -> list[str]:
        if any("{}" in a for a in self.argv):
            return [a.replace("{}", arg) for a in self.argv]
        return [*self.argv, arg]

    def run(self, path: str | os.PathLike[str], *, rel: str, fd: int | None = None) -> Verdict:
        arg = f"/dev/fd/{fd}" if fd is not None else os.fspath(path)
        label = _printable(shlex.join(self.argv), 80)
        try:
            proc = subprocess.Popen(
                self.argv_for(arg),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(fd,) if fd is not None else (),
                start_new_session=True,
                env={**os.environ, "CKPT_CHECK_FILE": rel},
            )
        except OSError as e:
            return Verdict(None, self.name, f"{label}: could not run ({e.strerror})")
        try:
            _out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Verdict(
                False, self.name, f"{label}: no answer within {self.timeout:g} s (--check-timeout)"
            )
        if proc.returncode == 0:
            return Verdict(True, self.name)
        lines = err.decode("utf-8", "replace").strip().splitlines()
        said = f": {_printable(lines[-1])}" if lines else ""
        return Verdict(False, self.name, f"{label} exited {proc.returncode}{said}")


class TreeEntry(Protocol):
    @property
    def path(self) -> str: ...  # relative to --dir, "/"-separated

    @property
    def type(self) -> str: ...  # "file", "dir" or "symlink"


class Registry:
    """The checks in force: the user's commands first, then the built-ins."""

    def __init__(self, commands: Iterable[CommandCheck] = (), *, builtin: bool = True) -> None:
        self.commands = tuple(commands)
        self.builtin = builtin

    def command_for(self, rel: str) -> CommandCheck | None:
        return next((c for c in self.commands if c.matches(rel)), None)

    def check_file(
        self,
        path: str | os.PathLike[str],
        *,
        rel: str | None = None,
        fd: int | None = None,
        size: int | None = None,
    ) -> Verdict:
        rel = rel if rel is not None else os.path.basename(os.fspath(path))
        command = self.command_for(rel)
        if command is not None:
            return command.run(path, rel=rel, fd=fd)
        if not self.builtin:
            return UNRECOGNISED
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # (a FIFO)
        try:
            opened = os.open(path, flags) if fd is None else fd
        except OSError as e:
            return Verdict(None, "", f"not readable ({e.strerror})")
        try:
            st = os.fstat(opened)
            if not stat.S_ISREG(st.st_mode):
                return Verdict(None, "", "not a regular file")
            return self.check_source(rel, FdSource(opened, st.st_size if size is None else size))
        except OSError as e:
            return Verdict(None, "", f"not readable ({e.strerror})")
        finally:
            if fd is None:
                os.close(opened)

    def check_source(self, rel: str, source: Source) -> Verdict:
        """The built-in check of these bytes, the file's path being `rel`."""
        if not self.builtin:
            return UNRECOGNISED
        cached = _Cached(source)
        check = choose(rel.rsplit("/", 1)[-1], cached.head)
        return UNRECOGNISED if check is None else check(cached)

    def check_tree(
        self, entries: Iterable[TreeEntry], *, changed: Collection[str] = ()
    ) -> dict[str, Verdict]:
        """A verdict per recognised directory of the scan."""
        if not self.builtin:
            return {}
        tree: dict[str, set[str]] = {}
        for e in entries:
            parent, _, name = e.path.rpartition("/")
            tree.setdefault(parent, set()).add(name)
            if e.type == "dir":
                tree.setdefault(e.path, set())
        changed = frozenset(changed)
        out: dict[str, Verdict] = {}
        for rel in sorted(tree):
            if not rel:
                continue
            parent = rel.rpartition("/")[0]
            siblings = {
                n: tree[p]
                for n in tree.get(parent, ())
                if (p := _join(parent, n)) in tree and p != rel
            }
            verdict = check_dir(rel, tree[rel], siblings=siblings, changed=changed)
            if verdict.ok is not None:
                out[rel] = verdict
        return out


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


DEFAULT = Registry()


def check_file(
    path: str | os.PathLike[str],
    *,
    rel: str | None = None,
    fd: int | None = None,
    size: int | None = None,
) -> Verdict:
    """The built-in checks of one file (see Registry.check_file)."""
    return DEFAULT.check_file(path, rel=rel, fd=fd, size=size)


def check_tree(
    entries: Iterable[TreeEntry], *, changed: Collection[str] = ()
) -> dict[str, Verdict]:
    return DEFAULT.check_tree(entries, changed=changed)


def check_path(path: Path) -> Verdict:
    """A file or a directory on disk, for tools and tests: a directory's
    verdict from its own listing and its siblings'."""
    if not path.is_dir():
        return check_file(path)
    parent = path.parent
    siblings = {p.name: os.listdir(p) for p in parent.iterdir() if p.is_dir() and p != path}
    return check_dir(path.name, os.listdir(path), siblings=siblings)
