"""The difference between two snapshots, path by path (`ckpt diff`), and an
entry as the operating commands show it in --json.

"""

from __future__ import annotations

import dataclasses
from typing import Any

from ckpt_cli.manifest import Entry, Manifest


@dataclasses.dataclass
class Change:
    before: Entry
    after: Entry
    what: list[str]  # "type", "content", "size", "mode", "target"


@dataclasses.dataclass
class Diff:
    added: list[Entry]
    removed: list[Entry]
    changed: list[Change]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def diff(a: Manifest, b: Manifest) -> Diff:
    """What differs from a to b, path by path: added, removed, and changed
    (type, content = chunk list, size, mode, symlink target; not mtimes)."""
    old = {e.path: e for e in a.entries}
    new = {e.path: e for e in b.entries}
    added = [new[p] for p in sorted(new.keys() - old.keys())]
    removed = [old[p] for p in sorted(old.keys() - new.keys())]
    changed = []
    for p in sorted(old.keys() & new.keys()):
        x, y = old[p], new[p]
        what = []
        if x.type != y.type:
            what.append("type")
        else:
            if x.chunks != y.chunks:
                what.append("content")
            if x.size != y.size:
                what.append("size")
            if x.mode != y.mode:
                what.append("mode")
            if x.target != y.target:
                what.append("target")
        if what:
            changed.append(Change(x, y, what))
    return Diff(added, removed, changed)


def entry_json(e: Entry) -> dict[str, Any]:
    """An entry as the operating commands show it in --json."""
    out: dict[str, Any] = {"path": e.path, "type": e.type, "mode": f"{e.mode:04o}"}
    if e.type == "file":
        out.update(size=e.size, chunks=len(e.chunks), mtime_ns=e.mtime_ns)
    elif e.type == "symlink":
        out["target"] = e.target
    if e.type != "symlink":
        out["check"] = e.check  # the format check it passed when taken; "" none applied
    return out
