"""Inspection without changes: what an empty or missing location is, checking
and re-hashing snapshots (also while a writer prunes), gc's dry run, diffs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpt_cli import world
from ckpt_cli.backends import Backend, open_backend
from ckpt_cli.diff import diff
from ckpt_cli.errors import ConfigError, RemoteError
from ckpt_cli.manifest import Entry, Manifest, hash_bytes
from ckpt_cli.repo_tools import open_existing
from ckpt_cli.repository import CHUNKS, CONFIG_KEY, Repository, chunk_key
from ckpt_cli.verify import check

from .helpers import CHUNK, DelegatingBackend


def _commit(repo: Repository, generation: int, files: dict[str, bytes]) -> Manifest:
    entries = []
    for path, content in sorted(files.items()):
        pieces = [content[i : i + CHUNK] for i in range(0, len(content), CHUNK)]
        for piece in pieces:
            repo.put_chunk(hash_bytes(piece), piece)
        entries.append(
            Entry(path, "file", 0o644, len(content), 1, tuple(hash_bytes(p) for p in pieces))
        )
    m = Manifest(f"{generation:08x}", generation, tuple(entries), CHUNK, 1000.0 + generation)
    repo.write_manifest(m)
    return m


# ---------------------------------------------------------------- opening


def test_an_empty_location_is_an_empty_repository(tmp_path: Path) -> None:
    assert open_existing(str(tmp_path / "not-yet"), []) is None
    (tmp_path / "made").mkdir()
    assert open_existing(str(tmp_path / "made"), []) is None
    assert not (tmp_path / "not-yet").exists()


def test_a_missing_parent_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(RemoteError, match="does not exist"):
        open_existing(str(tmp_path / "a" / "b"), [])


def test_objects_without_config_are_no_repository(tmp_path: Path) -> None:
    (tmp_path / "r" / "exp").mkdir(parents=True)
    (tmp_path / "r" / "exp" / CONFIG_KEY).write_text("{}")
    with pytest.raises(ConfigError, match="exp is one"):
        open_existing(str(tmp_path / "r"), [])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        open_existing(str(tmp_path / "file"), [])


def test_location_empty_then_not_on_both_backends(backend: Backend) -> None:
    url = backend.display  # a path, or memory://...
    assert open_existing(url, []) is None
    backend.write("other/thing", b"x")
    with pytest.raises(ConfigError, match="not a ckpt repository"):
        open_existing(url, [])


# ---------------------------------------------------------------- check


def test_check_finds_missing_and_corrupt_chunks(repo: Repository) -> None:
    m1 = _commit(repo, 1, {"a": b"1" * CHUNK, "b": b"shared"})
    m2 = _commit(repo, 2, {"a": b"2" * (CHUNK + 5), "b": b"shared"})
    missing = m2.files[0].chunks[1]
    corrupt = m1.files[0].chunks[0]
    repo.backend.delete(chunk_key(missing))
    repo.backend.write(chunk_key(corrupt), b"x" * CHUNK)
    repo.backend.write("snapshots/0000000003-00000003.json", b"{")

    quick = check(repo, repo.snapshots())
    assert [(c.ref.generation, [p.kind for p in c.problems]) for c in quick.snapshots] == [
        (3, ["manifest"]),
        (2, ["missing_chunk"]),
        (1, []),
    ]
    assert quick.chunks_hashed == 0

    starts: list[tuple[int, int]] = []
    full = check(repo, repo.snapshots(), full=True, on_start=lambda n, b: starts.append((n, b)))
    problems = {c.ref.generation: [(p.kind, p.chunk) for p in c.problems] for c in full.snapshots}
    assert problems[1] == [("corrupt_chunk", corrupt)]
    assert problems[2] == [("missing_chunk", missing)]
    # Present and named: 1*4096, 2*4096 and "shared" (the missing tail is not read).
    assert full.chunks_hashed == 3
    assert full.bytes_hashed == CHUNK + CHUNK + len(b"shared")
    assert starts == [(3, full.bytes_hashed)]
    assert "1 chunk missing" in full.snapshots[1].summary()


def test_a_symlink_out_of_the_directory_is_damage(repo: Repository) -> None:
    """restore refuses such a snapshot, so check calls it damaged too."""
    m = Manifest("0000000a", 1, (Entry("up", "symlink", 0o777, target="../x"),), CHUNK, 1.0)
    repo.write_manifest(m)
    (c,) = check(repo, repo.snapshots()).snapshots
    assert c.manifest is None and "leads out of the directory" in c.summary()


class PruningBackend(DelegatingBackend):
    """A writer's retention runs while the check looks: when chunks/ is
    listed, snapshot 1 and its only chunk are deleted."""

    def __init__(self, inner: Backend, manifest: Manifest) -> None:
        super().__init__(inner)
        self.manifest = manifest

    def list(self, prefix: str, *, temp: bool = False) -> list[str]:
        if prefix == CHUNKS and not temp:
            self.inner.delete(self.manifest.key)
            for d in self.manifest.chunk_digests():
                self.inner.delete(chunk_key(d))
        return self.inner.list(prefix, temp=temp)


def test_a_snapshot_pruned_during_the_check_is_not_damage(tmp_path: Path) -> None:
    repo = Repository(open_backend(str(tmp_path / "r")), CHUNK)
    m1 = _commit(repo, 1, {"a": b"old"})
    _commit(repo, 2, {"a": b"new"})
    pruning = Repository(PruningBackend(repo.backend, m1), CHUNK)
    result = check(pruning, pruning.snapshots())
    assert [c.ref.generation for c in result.snapshots] == [2]
    assert result.damaged == []


# ---------------------------------------------------------------- gc plan


def test_the_dry_run_of_a_collection_is_what_the_run_does(repo: Repository) -> None:
    """world.collect with dry_run deletes nothing and reports exactly what the
    real collection then deletes: the same manifests, chunks and temps."""
    _commit(repo, 1, {"a": b"1" * 100, "s": b"shared"})
    _commit(repo, 2, {"a": b"2" * 200, "s": b"shared"})
    _commit(repo, 3, {"a": b"3" * 300, "s": b"shared"})
    repo.put_chunk(hash_bytes(b"orphan"), b"orphan")
    before = repo.backend.list("")

    plan = world.collect(repo, 1, dry_run=True)

    assert repo.backend.list("") == before, "the dry run deleted something"
    assert [r.generation for r in plan.dropped] == [2, 1]
    assert [r.generation for r in plan.kept] == [3]
    assert plan.known_bytes == 100 + 200 and plan.unsized == 1
    done = world.collect(repo, 1, dry_run=False)
    assert (done.kept, done.dropped, done.chunks, done.temps) == (
        plan.kept,
        plan.dropped,
        plan.chunks,
        plan.temps,
    )
    gone = set(before) - set(repo.backend.list(""))
    assert gone == {r.key for r in plan.dropped} | {chunk_key(d) for d in plan.chunks}


# ---------------------------------------------------------------- diff


def test_diff_by_type_content_mode_and_target() -> None:
    def m(*entries: Entry) -> Manifest:
        return Manifest("aaaaaaaa", 1, entries, CHUNK, 0.0)

    h1, h2 = hash_bytes(b"1"), hash_bytes(b"2")
    a = m(
        Entry("f", "file", 0o644, 1, 5, (h1,)),
        Entry("g", "file", 0o644, 1, 5, (h1,)),
        Entry("l", "symlink", 0o777, target="f"),
        Entry("x", "dir", 0o755),
        Entry("gone", "file", 0o644, 1, 5, (h1,)),
    )
    b = m(
        Entry("f", "file", 0o600, 1, 9, (h2,)),  # content and mode; mtime is ignored
        Entry("g", "file", 0o644, 1, 99, (h1,)),  # only the mtime: unchanged
        Entry("l", "symlink", 0o777, target="g"),
        Entry("x", "file", 0o644, 1, 5, (h1,)),
        Entry("new", "dir", 0o755),
    )
    d = diff(a, b)
    assert [e.path for e in d.added] == ["new"]
    assert [e.path for e in d.removed] == ["gone"]
    assert [(c.after.path, c.what) for c in d.changed] == [
        ("f", ["content", "mode"]),
        ("l", ["target"]),
        ("x", ["type"]),
    ]
    assert diff(a, a).empty
