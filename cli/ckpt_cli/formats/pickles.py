"""The pickle-based formats: plain pickles (protocol 2+, joblib) and torch's
legacy format (`torch.save(..., _use_new_zipfile_serialization=False)`),
checked without running any of their code. What is verified, exactly:

- torch legacy: the whole layout: the magic number, protocol version and
  system-info pickles, the object pickle (read by an unpickler that imports
  and calls nothing: every global is a stand-in) recording each storage's
  key, type and element count, the key-list pickle, then per key an 8-byte
  element count equal to the recorded one followed by count x element-size
  bytes, ending exactly at the file's end (torch's _legacy_save writes
  exactly this). The pickles are parsed from the first PICKLE_WINDOW bytes,
  a window 8x larger each time they run past it, up to PICKLE_CAP (their
  size grows with the number of tensors, not with their bytes); the element
  counts of the first TORCH_RECORD_CAP storages are read (8 bytes each).
  Pickles cut short fail; pickles that do not parse otherwise (damaged
  rather than cut, or using what the stand-ins do not support) are
  reported as not checked.
- pickle: ends with the STOP opcode; a file up to SMALL_PICKLE is parsed
  whole (its opcodes, nothing executed: one or more pickles ending exactly
  at the file's end), except joblib's with arrays (their bytes are written
  raw between opcodes). A larger pickle is only checked for its last byte:
  a prefix that happens to end in 0x2e passes. (The last frame of a
  protocol 4+ pickle cannot be relied on: after a large bytes or str
  payload the final opcodes are written unframed.)
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
from typing import Any

from ckpt_cli.formats.checks import STOP, Source, Torn, Unchecked, exact

PICKLE_CAP = 64 << 20
#: The legacy pickles are parsed from this many bytes first (x8 until they fit).
PICKLE_WINDOW = 64 << 10
SMALL_PICKLE = 1 << 20
#: Storage records whose element count is read, at the most (torch legacy).
TORCH_RECORD_CAP = 10_000
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
TORCH_LEGACY_PROTOCOL = 1001
_TORCH_MAGIC_LE = TORCH_LEGACY_MAGIC.to_bytes(10, "little")
#: The first 17 bytes of a legacy file written with torch's default protocol 2.
TORCH_LEGACY_HEAD = b"\x80\x02\x8a\x0a" + _TORCH_MAGIC_LE + b"."
_FRAME = 0x95
JOBLIB_ARRAYS = b"joblib.numpy_pickle"


def is_torch_legacy(head: bytes) -> bool:
    """The first pickle of the file is torch's legacy magic number: LONG1 right
    after PROTO (protocol 2, torch's default, or 3), or after a FRAME header
    (protocol 4+)."""
    long1 = b"\x8a\x0a" + _TORCH_MAGIC_LE
    if head[:1] != b"\x80" or len(head) < 3:
        return False
    if head[1] in (2, 3):
        return head[2:14] == long1
    return head[1] in (4, 5) and head[2] == _FRAME and head[11:23] == long1


def check_pickle(src: Source) -> None:
    size = src.size
    if size < 3:
        raise Torn(f"{size} bytes: truncated")
    if src.read(size - 1, 1)[0] != STOP:
        raise Torn("does not end with the STOP opcode (truncated)")
    if size <= SMALL_PICKLE:
        data = src.read(0, size)
        # joblib writes array bytes raw between the opcodes: not parseable alone
        if JOBLIB_ARRAYS not in data:
            _parse_to_end(data, "pickle")


def _parse_to_end(data: bytes, what: str) -> None:
    """The opcodes of data parse (nothing is executed) and the last is a STOP
    ending exactly at the end; pickles before it, if any, parse too."""
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        try:
            for _op, _arg, _pos in pickletools.genops(stream):
                pass
        except Exception as e:  # genops, the reference parser: any failure is a bad pickle
            raise Torn(f"{what} does not parse ({e.__class__.__name__})") from None


_TORCH_ELEMENT = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexDoubleStorage": 16,
    "ComplexFloatStorage": 8,
    "QInt8Storage": 1,
    "QUInt8Storage": 1,
    "QInt32Storage": 4,
    "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1,
    "UntypedStorage": 1,
}


class _Stub:
    """Whatever a global names, in the restricted unpickler: it records its
    arguments and accepts the container opcodes, and runs no code."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub(*args)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def add(self, value: Any) -> None:
        pass


def _stub_class(module: str, name: str) -> type[_Stub]:
    return type(name, (_Stub,), {"_global": (module, name)})


_PERSISTENT = _stub_class("persistent", "id")


class _Records(pickle.Unpickler):
    """Unpickles with stand-ins for every global; collects torch's storage
    records (first occurrence of each key): key -> (type name, element count)."""

    def __init__(self, file: io.BytesIO, storages: dict[str, tuple[str, int]]) -> None:
        super().__init__(file)
        self.storages = storages
        self._classes: dict[tuple[str, str], type[_Stub]] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key not in self._classes:
            self._classes[key] = _stub_class(module, name)
        return self._classes[key]

    def persistent_load(self, pid: Any) -> Any:
        """A stand-in class (a legacy "module" record stands for a class,
        which NEWOBJ needs to be a type)."""
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            kind, key, numel = pid[1], pid[2], pid[4]
            name = getattr(kind, "_global", ("", ""))[1]
            if isinstance(key, str) and isinstance(numel, int):
                self.storages.setdefault(key, (name, numel))
        return _PERSISTENT


class _Short(Exception):
    """The pickles run past the bytes read so far."""


def _legacy_pickles(data: bytes) -> tuple[dict[str, tuple[str, int]], list[str], int]:
    """The five pickles at the start of a legacy file: its storage records
    (key -> (type name, element count)), its storage keys, and where the
    storage data starts."""
    stream = io.BytesIO(data)
    storages: dict[str, tuple[str, int]] = {}

    def load() -> Any:
        try:
            return _Records(stream, storages).load()
        except Exception as e:
            if stream.tell() >= len(data):
                raise _Short from None
            # damaged, or a stand-in met a use it does not support
            raise Unchecked(f"pickle part not understood ({e.__class__.__name__})") from None

    if load() != TORCH_LEGACY_MAGIC:
        raise Torn("magic number missing")
    if load() != TORCH_LEGACY_PROTOCOL:
        raise Unchecked("torch legacy protocol version not understood")
    load()  # sys_info
    load()  # the object
    keys = load()
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise Torn("storage key list damaged")
    return storages, keys, stream.tell()


def check_torch_legacy(src: Source) -> None:
    window = min(src.size, PICKLE_WINDOW)
    while True:
        try:
            storages, keys, offset = _legacy_pickles(src.read(0, window))
            break
        except _Short:
            if window >= src.size:
                raise Torn("truncated inside its pickles") from None
            if window >= PICKLE_CAP:
                raise Unchecked(f"pickle part over {PICKLE_CAP >> 20} MiB") from None
            window = min(src.size, window * 8, PICKLE_CAP)
    for i, key in enumerate(keys):
        if key not in storages:
            raise Torn("a storage key has no record in the object pickle")
        kind, numel = storages[key]
        element = _TORCH_ELEMENT.get(kind)
        if element is None:
            raise Unchecked("storage type not understood")
        if i < TORCH_RECORD_CAP:
            (stored,) = struct.unpack("<q", exact(src, offset, 8, "storage record"))
            if stored != numel:
                raise Torn(f"storage record at {offset} says {stored} elements, not {numel}")
        offset += 8 + numel * element
        if offset > src.size:
            raise Torn(f"storages need {offset} bytes at least, the file has {src.size}")
    if offset != src.size:
        raise Torn(f"storages end at {offset}, the file has {src.size} bytes")
