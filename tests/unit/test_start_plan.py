"""start_plan: what the child starts from, decided from plain values."""

from __future__ import annotations

from pathlib import Path

from ckpt_cli.manifest import Entry, Manifest, ManifestError
from ckpt_cli.repository import SnapshotRef
from ckpt_cli.snapshotter import LocalEntry
from ckpt_cli.start_plan import ASIDE, Start, StartPlan, plan_rank_start, plan_start
from ckpt_cli.world import Choice

DIR = Path("/data/ckpt")
T0 = 1_700_000_000.0  # when the snapshots were taken (seconds)
NS = 10**9


def snap(gen: int, files: dict[str, int], *, verified: bool | None = None,
         step: int | None = None, stream: str = "") -> tuple[SnapshotRef, Manifest]:  # fmt: skip
    """A snapshot of generation `gen` holding files (path -> mtime in s)."""
    entries = tuple(
        Entry(p, "file", size=len(p), mtime_ns=int(t * NS)) for p, t in sorted(files.items())
    )
    m = Manifest(f"id{gen:06d}", gen, entries, 1024, T0 + gen, verified=verified, step=step)
    return SnapshotRef(gen, m.id, stream + m.key, stream), m


def local(files: dict[str, float], dirs: tuple[str, ...] = ()) -> list[LocalEntry]:
    """A scan of --dir: files (path -> mtime in s), same sizes as snap's."""
    out = [LocalEntry(d, "dir", 0o755, 0, 0, 1) for d in dirs]
    out += [LocalEntry(p, "file", 0o644, len(p), int(t * NS), 2) for p, t in files.items()]
    return out


def test_no_restore_starts_as_it_is_and_adopts_the_newest() -> None:
    plan = plan_start(DIR, local({"a": T0}), [snap(1, {"a": T0})], restore_enabled=False)
    assert plan.start is Start.FRESH and plan.create and plan.adopt_newest
    assert plan.why == f"--no-restore: starting from {DIR} as it is"


def test_an_explicit_snapshot_is_always_restored() -> None:
    newer_local = local({"a": T0 + 999})
    plan = plan_start(DIR, newer_local, [snap(1, {"a": T0})], snapshot="id000001")
    assert plan == StartPlan(Start.RESTORE, snapshot="id000001")


def test_an_empty_dir_with_no_snapshot_starts_fresh() -> None:
    plan = plan_start(DIR, local({}, dirs=("lost+found",)), [], any_snapshot=False)
    assert plan.start is Start.FRESH and plan.create and not plan.adopt_newest
    assert "remote has no snapshot yet: starting fresh" in plan.why


def test_an_empty_dir_gets_the_snapshot_a_restore_picks() -> None:
    plan = plan_start(DIR, [], [], any_snapshot=True)
    assert plan == StartPlan(Start.RESTORE)
    assert plan_start(DIR, [], [snap(1, {"a": T0})]).start is Start.RESTORE


def test_a_dir_holding_the_picked_snapshot_is_used_and_repaired() -> None:
    ref, m = snap(2, {"a": T0, "b": T0})
    plan = plan_start(DIR, local({"a": T0, "b": T0}), [(ref, m), snap(1, {"a": T0})])
    assert plan.start is Start.USE and plan.parent == m and plan.repair
    assert plan.why == f"{DIR} already holds snapshot {m.id}: nothing to restore"


def test_a_dir_holding_an_older_snapshot_is_replaced() -> None:
    loaded = [snap(2, {"a": T0 + 5}), snap(1, {"a": T0})]
    plan = plan_start(DIR, local({"a": T0}), loaded)
    assert plan.start is Start.RESTORE and plan.snapshot is None and plan.ref is None
    assert "holds snapshot id000001 (generation 1), older than id000002" in plan.why
    assert plan.why.endswith(f"replacing it{ASIDE}")


def test_a_dir_holding_a_newer_unverified_snapshot_is_replaced_by_the_picked_one() -> None:
    """No clock: holding a snapshot exactly says what it is, even if newer."""
    loaded = [snap(2, {"a": T0 + 9999}, verified=False), snap(1, {"a": T0})]
    plan = plan_start(DIR, local({"a": T0 + 9999}), loaded)
    assert plan.start is Start.RESTORE
    assert "which a restore does not pick (unverified)" in plan.why


def test_a_dir_holding_a_suspect_snapshot_says_suspect() -> None:
    ref2, m2 = snap(2, {"a": T0 + 5}, stream="ranks/1/")
    loaded = [(ref2, m2), snap(1, {"a": T0}, stream="ranks/1/")]
    plan = plan_start(DIR, local({"a": T0 + 5}), loaded, suspect={ref2.key}, stream="ranks/1/")
    assert plan.start is Start.RESTORE and "does not pick (suspect)" in plan.why


def test_a_dir_modified_after_the_newest_snapshot_is_kept() -> None:
    ref, m = snap(3, {"a": T0})
    plan = plan_start(DIR, local({"a": T0, "new": T0 + 3600}), [(ref, m)])
    assert plan.start is Start.KEEP and plan.parent == m and plan.repair
    assert plan.notes[-1].warn and "keeping the local state" in plan.why


def test_an_older_dir_is_replaced() -> None:
    plan = plan_start(DIR, local({"other": T0 - 3600}), [snap(3, {"a": T0})])
    assert plan.start is Start.RESTORE
    assert plan.why == f"{DIR} is older than snapshot id000003: replacing it{ASIDE}"


def test_no_readable_snapshot_keeps_the_dir_with_a_warning() -> None:
    ref = SnapshotRef(1, "id000001", "snapshots/0000000001-id000001.json")
    plan = plan_start(DIR, local({"a": T0}), [(ref, ManifestError("is not JSON"))], display="R")
    assert plan.start is Start.FRESH and not plan.create and not plan.adopt_newest
    assert (
        plan.notes[-1].warn and plan.why == f"no snapshot in R is readable; keeping {DIR} as it is"
    )


def test_a_non_empty_dir_and_no_snapshot_is_uploaded_as_the_first() -> None:
    plan = plan_start(DIR, local({"a": T0}), [])
    assert plan.start is Start.FRESH and not plan.notes[-1].warn
    assert plan.why.endswith("is uploaded as the first")


def _choice(m: Manifest | None, ref: SnapshotRef | None, consistent: bool) -> Choice:
    return Choice(m, ref, m.step if m else None, consistent, "step 7, complete on all 2 ranks")


def test_a_rank_restores_its_part_of_a_consistent_step() -> None:
    ref, m = snap(4, {"w": T0}, step=7, stream="ranks/1/")
    plan = plan_rank_start(DIR, _choice(m, ref, True), local({"w": T0 + 99}), rank=1,
                           stream="ranks/1/")  # fmt: skip
    assert plan.start is Start.RESTORE and plan.ref == ref and plan.parent == m
    assert [n.text for n in plan.notes] == [
        f"restoring rank 1's snapshot {m.id} of step 7, complete on all 2 ranks",
        f"{DIR} differs from snapshot {m.id}: replacing it, so that every rank starts "
        f"from the same step{ASIDE}",
    ]


def test_a_rank_holding_its_part_uses_it_without_repair() -> None:
    ref, m = snap(4, {"w": T0}, step=7, stream="ranks/1/")
    plan = plan_rank_start(DIR, _choice(m, ref, True), local({"w": T0}), rank=1, stream="ranks/1/")
    assert plan.start is Start.USE and plan.parent == m and not plan.repair


def test_a_rank_with_an_empty_dir_restores_without_a_differs_line() -> None:
    ref, m = snap(4, {"w": T0}, step=7, stream="ranks/1/")
    plan = plan_rank_start(DIR, _choice(m, ref, True), [], rank=1, stream="ranks/1/")
    assert plan.start is Start.RESTORE and len(plan.notes) == 1


def test_a_rank_without_a_cut_warns_and_follows_the_single_node_rule() -> None:
    ref, m = snap(4, {"w": T0}, stream="ranks/1/")
    plan = plan_rank_start(DIR, _choice(m, ref, False), [], rank=1, stream="ranks/1/")
    assert plan.start is Start.SINGLE and plan.notes[0].warn
    assert plan_rank_start(DIR, None, [], rank=1, stream="ranks/1/") == StartPlan(Start.SINGLE)


def test_a_rank_of_a_grown_world_starts_as_it_is() -> None:
    choice = Choice(None, None, 7, True, "step 7 was written by 2 ranks: rank 2 starts empty")
    plan = plan_rank_start(DIR, choice, [], rank=2, stream="ranks/2/")
    assert plan.start is Start.FRESH and plan.create and plan.adopt_newest
    assert plan.why == f"{choice.note}: starting from {DIR} as it is"
