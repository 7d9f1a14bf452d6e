"""The structural checks of the file formats training scripts write: is this
byte string one whole file of its format? `formats` holds the registry and
the API; this module holds the vocabulary (Source, Verdict, Torn, Unchecked)
and one function per format, each reading only what it needs through a
`Source` (headers, trailers, directories), never the data; `formats.pickles`
has the pickle-based ones, `formats.dirs` the directory formats.

Each `check_*` returns None when the file is whole, or raises `Torn` (the
file is not whole: truncated, being written, overwritten in place) or
`Unchecked` (it cannot be told cheaply: a part over its read cap, a variant
not understood). What each check verifies, exactly:

- zip (torch.save's default format, Lightning .ckpt, Keras .keras, numpy
  .npz): the end-of-central-directory record ends the file (its comment
  length included); with ZIP64 the locator and the ZIP64 record sit right
  before it; the central directory ends exactly where that record starts,
  every entry parses, their count is the record's, and each entry's local
  header (signature and name) is where the entry says, before the directory.
  A directory over ZIP_DIR_CAP is not read (the record checks still run).
  Not verified: CRCs and compressed data (a full read).
- safetensors: 8-byte header length, the JSON header parses, and 8 + header
  length + the largest data offset == file size (the loader's own rule).
- npy: magic, version, header dict; header + prod(shape) x itemsize == size
  (itemsize from the descr, structured dtypes included; object arrays: the
  pickle after the header passes the pickle check).
- HDF5: superblock at 0, 512, 1024, 2048, ... (versions 0-3; a file
  named as HDF5 without one fails: it cannot be opened); its end-of-file
  address == file size; a version 3 superblock not marked open for writing
  (the library sets the flag while a writer has it open). Not verified:
  the object tree.
- JSON (up to JSON_CAP): parses (a leading UTF-8 BOM allowed).
"""

from __future__ import annotations

import ast
import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

ZIP_DIR_CAP = 16 << 20
SAFETENSORS_HEADER_CAP = 100_000_000  # the safetensors library's own limit
NPY_HEADER_CAP = 1 << 20
JSON_CAP = 16 << 20
#: Local headers read per zip at the most (evenly spread, the last one always).
ZIP_LOCAL_CAP = 16

ZIP_LOCAL = b"PK\x03\x04"
ZIP_END = b"PK\x05\x06"
ZIP_DIR = b"PK\x01\x02"
ZIP64_END = b"PK\x06\x06"
ZIP64_LOCATOR = b"PK\x06\x07"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
STOP = ord(".")


class Source(Protocol):
    """Bytes to check: a file descriptor, a buffer, or the chunks of a stored
    snapshot. `read` returns fewer bytes than asked only at the end."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


@dataclass(frozen=True)
class Verdict:
    ok: bool | None  # True: whole; False: not whole (in progress, torn); None: no check applies
    check: str  # the check that decided: "zip", "safetensors", "hf-trainer", "command:GLOB"...
    reason: str = ""  # False: why, naming the format; None: why nothing was checked


UNRECOGNISED = Verdict(None, "", "format not recognised")


class Slice:
    """The bytes of a Source from `start` on, as a Source."""

    def __init__(self, src: Source, start: int) -> None:
        self.src, self.start = src, start

    @property
    def size(self) -> int:
        return max(0, self.src.size - self.start)

    def read(self, offset: int, length: int) -> bytes:
        return self.src.read(self.start + offset, min(length, self.size - offset))


class Torn(Exception):
    """The bytes are not one whole file of the format; the message says why."""


class Unchecked(Exception):
    """The format was recognised but cannot be checked cheaply; says why."""


def exact(src: Source, offset: int, length: int, what: str) -> bytes:
    if offset < 0 or offset + length > src.size:
        raise Torn(f"{what} at byte {offset} lies past the end ({src.size} bytes)")
    data = src.read(offset, length)
    if len(data) != length:
        raise Torn(f"{what} at byte {offset} lies past the end ({src.size} bytes)")
    return data


# -- zip


def check_zip(src: Source) -> None:
    size = src.size
    if size < 22:
        raise Torn(f"{size} bytes: shorter than a zip end record (truncated)")
    end = _zip_end(src)
    fields = struct.unpack("<4s4H2LH", exact(src, end, 22, "end record"))
    _, disk, dir_disk, _on_disk, entries, dir_size, dir_offset, _comment = fields
    if disk or dir_disk:
        raise Unchecked("multi-disk zip")
    dir_end = end
    locator = end - 20
    if locator >= 0 and src.read(locator, 4) == ZIP64_LOCATOR:
        _, _disk, rec_off, _disks = struct.unpack("<4sLQL", exact(src, locator, 20, "locator"))
        if rec_off + 56 > locator:
            raise Torn("ZIP64 locator points past itself")
        rec = exact(src, rec_off, 56, "ZIP64 end record")
        sig, rec_len = struct.unpack_from("<4sQ", rec)
        entries, dir_size, dir_offset = struct.unpack_from("<3Q", rec, 32)
        if sig != ZIP64_END or rec_off + 12 + rec_len != locator:
            raise Torn("ZIP64 end record is not where the locator says")
        dir_end = rec_off
    elif 0xFFFFFFFF in (dir_size, dir_offset):  # (65,535 entries fit without ZIP64)
        raise Torn("ZIP64 end record missing")
    if dir_offset + dir_size != dir_end:
        raise Torn(
            f"central directory at {dir_offset} ({dir_size} bytes) does not end at the "
            f"end record ({dir_end}): overwritten or truncated"
        )
    if dir_size > ZIP_DIR_CAP:
        return  # the end record's checks hold; the directory is too large to read
    names = _zip_entries(src.read(dir_offset, dir_size), entries, dir_offset)
    if len(names) > ZIP_LOCAL_CAP:
        step = len(names) / ZIP_LOCAL_CAP
        names = [names[int(i * step)] for i in range(ZIP_LOCAL_CAP - 1)] + [names[-1]]
    for offset, name in names:
        head = exact(src, offset, 30 + len(name), "local header")
        if head[:4] != ZIP_LOCAL or head[30:] != name:
            raise Torn(f"no local header at {offset} where the central directory says")


def _zip_end(src: Source) -> int:
    """Offset of the end record: the one whose comment reaches the file's end."""
    size = src.size
    last = src.read(size - 22, 22)
    if last[:4] == ZIP_END and last[20:22] == b"\0\0":
        return size - 22
    start = max(0, size - 22 - 0xFFFF)
    tail = src.read(start, size - start)
    pos = len(tail) - 22
    while (pos := tail.rfind(ZIP_END, 0, pos + 4)) >= 0:
        (comment,) = struct.unpack_from("<H", tail, pos + 20)
        if pos + 22 + comment == len(tail):
            return start + pos
        pos -= 1
    raise Torn("no end-of-central-directory record at the end (truncated or being written)")


def _zip_entries(data: bytes, expected: int, dir_offset: int) -> list[tuple[int, bytes]]:
    """(local header offset, name) of every central directory entry."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        if data[pos : pos + 4] != ZIP_DIR or pos + 46 > len(data):
            raise Torn(f"central directory entry {len(out)} is damaged")
        csize, usize, nlen, xlen, clen = struct.unpack_from("<2L3H", data, pos + 20)
        (offset,) = struct.unpack_from("<L", data, pos + 42)
        name = data[pos + 46 : pos + 46 + nlen]
        extra = data[pos + 46 + nlen : pos + 46 + nlen + xlen]
        if 0xFFFFFFFF in (csize, usize, offset):
            csize, offset = _zip64_extra(extra, csize, usize, offset)
        if offset + 30 + nlen + csize > dir_offset:
            raise Torn(f"entry {len(out)} reaches past the central directory")
        out.append((offset, name))
        pos += 46 + nlen + xlen + clen
    if pos != len(data) or len(out) != expected:
        raise Torn(f"central directory holds {len(out)} entries, its end record says {expected}")
    return out


def _zip64_extra(extra: bytes, csize: int, usize: int, offset: int) -> tuple[int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<2H", extra, pos)
        body = extra[pos + 4 : pos + 4 + n]
        if tag == 1:
            values = [v for (v,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
            if usize == 0xFFFFFFFF and values:
                values.pop(0)
            if csize == 0xFFFFFFFF and values:
                csize = values.pop(0)
            if offset == 0xFFFFFFFF and values:
                offset = values.pop(0)
            return csize, offset
        pos += 4 + n
    raise Torn("ZIP64 sizes missing from a central directory entry")


# -- safetensors


def check_safetensors(src: Source) -> None:
    (n,) = struct.unpack("<Q", exact(src, 0, 8, "header length"))
    if n > SAFETENSORS_HEADER_CAP:
        raise Torn(f"header length {n} is over the format's limit")
    header = exact(src, 8, n, "header")
    try:
        meta = json.loads(header)
    except ValueError as e:
        raise Torn(f"header does not parse ({e.__class__.__name__})") from None
    if not isinstance(meta, dict):
        raise Torn("header is not a JSON object")
    end = 0
    for key, info in meta.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise Torn("a tensor has no data_offsets")
        begin, stop = offsets
        if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop):
            raise Torn("a tensor has bad data_offsets")
        end = max(end, stop)
    if 8 + n + end != src.size:
        raise Torn(f"header says {8 + n + end} bytes, the file has {src.size}")


# -- npy


def check_npy(src: Source) -> None:
    head = exact(src, 0, 10, "npy header")
    major = head[6]
    if major == 1:
        (hlen,) = struct.unpack_from("<H", head, 8)
        start = 10
    elif major in (2, 3):
        (hlen,) = struct.unpack("<L", exact(src, 8, 4, "npy header length"))
        start = 12
    else:
        raise Unchecked(f"npy version {major} not understood")
    if hlen > NPY_HEADER_CAP:
        raise Unchecked("npy header over the read cap")
    text = exact(src, start, hlen, "npy header").decode("utf-8" if major == 3 else "latin-1")
    try:
        meta = ast.literal_eval(text.strip())
        descr, shape = meta["descr"], tuple(meta["shape"])
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError):
        raise Torn("npy header does not parse") from None
    data = start + hlen
    if descr in ("O", "|O", "<O", ">O"):  # object array: a pickle follows
        from ckpt_cli.formats.pickles import check_pickle  # (it imports this module)

        try:
            check_pickle(Slice(src, data))
        except Torn as e:
            raise Torn(f"object array's pickle: {e}") from None
        return
    itemsize = _itemsize(descr)
    if itemsize is None:
        raise Unchecked("npy dtype not understood")
    count = math.prod(int(d) for d in shape)
    if data + count * itemsize != src.size:
        raise Torn(f"header says {data + count * itemsize} bytes, the file has {src.size}")


_SIMPLE = re.compile(r"[<>|=]?([?bBiufcmMUSaVe])(\d*)(\[\w+\])?")


def _itemsize(descr: object) -> int | None:
    """Bytes per element of a numpy descr (dtype.str or dtype.descr); None if
    not understood."""
    if isinstance(descr, str):
        m = _SIMPLE.fullmatch(descr)
        if m is None:
            return None
        kind, digits = m.group(1), m.group(2)
        if kind == "?":
            return 1
        if not digits:
            return None
        return int(digits) * (4 if kind == "U" else 1)
    if isinstance(descr, list):
        total = 0
        for field in descr:
            if not (isinstance(field, tuple) and len(field) in (2, 3)):
                return None
            size = _itemsize(field[1])
            if size is None:
                return None
            shape = field[2] if len(field) == 3 else ()
            if isinstance(shape, int):
                shape = (shape,)
            total += size * math.prod(shape)
        return total
    return None


# -- HDF5


def hdf5_superblock(src: Source) -> int | None:
    """Offset of the HDF5 signature: 0, 512, 1024, 2048, ...; None if none."""
    offset = 0
    while offset + 8 <= src.size:
        if src.read(offset, 8) == HDF5_MAGIC:
            return offset
        offset = 512 if offset == 0 else offset * 2
    return None


def check_hdf5(src: Source) -> None:
    base = hdf5_superblock(src)
    if base is None:  # (h5py cannot open it either: a user block cut before it)
        raise Torn(f"no superblock at 0, 512, 1024, ... in {src.size} bytes")
    sb = src.read(base, 128)
    if len(sb) < 16:
        raise Torn("superblock truncated")
    version = sb[8]
    if version in (0, 1):
        width = sb[13]
        at = 24 if version == 0 else 28
    elif version in (2, 3):
        width = sb[9]
        at = 12
        if version == 3 and sb[11] & 0b101:
            raise Torn("marked open for writing by the HDF5 library")
    else:
        raise Unchecked(f"superblock version {version} not understood")
    if width not in (2, 4, 8, 16):
        raise Torn("superblock damaged (size of offsets)")
    at += 2 * width  # base address, then free-space (0/1) or extension (2/3)
    if at + width > len(sb):
        raise Torn("superblock truncated")
    eof = int.from_bytes(sb[at : at + width], "little")
    if eof != src.size:
        raise Torn(f"superblock says {eof} bytes, the file has {src.size}")


# -- JSON


def check_json(src: Source) -> None:
    if src.size > JSON_CAP:
        raise Unchecked(f"over {JSON_CAP >> 20} MiB: not parsed")
    data = src.read(0, src.size)
    try:
        json.loads(data.removeprefix(b"\xef\xbb\xbf"))  # a UTF-8 BOM is no damage
    except (ValueError, RecursionError) as e:
        raise Torn(f"does not parse ({e.__class__.__name__})") from None


Check = Callable[[Source], None]
