"""What the repository commands share (commands/_shared): snapshots named in
one line, at most NAMED of them."""

from __future__ import annotations

from ckpt_cli.commands._shared import NAMED, _names
from ckpt_cli.repository import SnapshotRef


def _ref(generation: int) -> SnapshotRef:
    return SnapshotRef(generation=generation, id=f"{generation:08x}", key=f"snapshots/{generation}")


def test_a_few_snapshots_are_all_named() -> None:
    assert _names([_ref(2), _ref(1)]) == "00000002 (2), 00000001 (1)"


def test_beyond_named_the_rest_is_counted() -> None:
    text = _names([_ref(g) for g in range(NAMED + 3, 0, -1)])
    assert text.endswith(f"{_ref(4).id} (4) and 3 more (--json for all)")
    assert text.count("(") == NAMED + 1
