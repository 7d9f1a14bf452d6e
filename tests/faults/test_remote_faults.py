"""Remote faults against real storage and the real binary (tests/backends/
test_outage.py already covers an S3 server that stops while the child runs,
a stalled server and throttling; these are the other angles):

- the S3 server (s3rver, which keeps its data across a restart) goes away in
  the middle of the restore at start, or during the final flush and comes
  back before --flush-timeout;
- a read-only remote (a read-only bind mount as root, chmod otherwise);
- exactly one object of the remote replaced by garbage behind ckpt's back (a
  chunk, the newest manifest, ckpt.json, lease.json), on S3 (moto) and file://.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration._util import (
    PY,
    Running,
    read_report,
    reporter,
    wait_for,
    write_script,
)
from stores import Server, Store

from ._io import Objects, ckpt, leftovers, one_error, read_only, tree, warnings, writable_probe
from ._tally import record

pytestmark = pytest.mark.timeout(240)

UNAVAILABLE, CONFIG = 69, 78


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        r.cleanup()


def _run(
    args: list[str], store: Store | None, cwd: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """ckpt with the store's environment (credentials, endpoint) and env on top."""
    return ckpt(args, cwd=cwd, env={**(store.env if store else {}), **env}, timeout=180)


def _ok(
    args: list[str], store: Store | None, cwd: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    res = _run(args, store, cwd, **env)
    assert res.returncode == 0, f"ckpt {' '.join(args)}: {res.returncode}\n{res.stderr}"
    return res


def _files(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _push(src: Path, store: Store, cwd: Path) -> str:
    """`ckpt push`; the new snapshot's manifest key."""
    objects = Objects(store.url, store.storage_options)
    before = set(objects.manifests())
    _ok(["push", str(src), store.url], store, cwd)
    new = [k for k in objects.manifests() if k not in before]
    assert len(new) == 1, new
    return new[0]


def _snap_id(key: str) -> str:
    return key.rsplit("-", 1)[1].removesuffix(".json")


# ---------------------------------------------------------------- S3 server down and back


class _Tripwire(http.server.ThreadingHTTPServer):
    """A pass-through proxy in front of the S3 server that stops the real
    server at the first GET of a chunk (the restore is under way) and drops
    that request; while the server is down every request is dropped."""

    daemon_threads = True

    def __init__(self, server: Server) -> None:
        super().__init__(("127.0.0.1", 0), _TripwireHandler)
        self.upstream = server
        self.tripped = threading.Event()
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port


class _TripwireHandler(http.server.BaseHTTPRequestHandler):
    server: _Tripwire
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.server.lock:
            if (
                self.command == "GET"
                and "/chunks/" in self.path
                and not self.server.tripped.is_set()
            ):
                self.server.upstream.stop()
                self.server.tripped.set()
        if not self.server.upstream.running:
            self._drop()
            return
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
        except OSError:
            self._drop()
            return
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


@contextlib.contextmanager
def _tripwire(server: Server) -> Iterator[_Tripwire]:
    proxy = _Tripwire(server)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_s3_down_in_the_middle_of_the_restore_leaves_the_dir_as_it_was(
    store_of: Any, tmp_path: Path
) -> None:
    """Injected: the S3 server (s3rver) is stopped at the first chunk download
    of the restore that `ckpt run` does at start (the dir is older than the
    remote's snapshot, so it is being replaced), and started again later.
    Asserted: ckpt run exits 69 with one error naming the remote; the child
    never starts; --dir keeps its old contents and no temp dir is left; with
    the server back on the same port, the same command restores every byte."""
    store: Store = store_of("s3-s3rver")
    assert store.server is not None and store.server.persistent
    src = _files(tmp_path / "src", {f"part-{i}.bin": os.urandom(1024 * 1024) for i in range(4)})
    _push(src, store, tmp_path)

    ck = _files(tmp_path / "ck", {"old.txt": b"an older local state"})
    hour_ago = time.time() - 3600
    os.utime(ck / "old.txt", (hour_ago, hour_ago))
    before = tree(ck)
    report = tmp_path / "report.json"
    args = ["run", "--dir", str(ck), "--remote", store.url, "--backoff", "0", "--"]
    args += reporter(tmp_path, report)
    with _tripwire(store.server) as proxy:
        res = _run(
            args,
            store,
            tmp_path,
            AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{proxy.port}",
            CKPT_IO_TIMEOUT="3",
            AWS_MAX_ATTEMPTS="1",
        )
        assert proxy.tripped.is_set(), "the restore never asked for a chunk"
    assert res.returncode == UNAVAILABLE, res.stderr
    one_error(res, store.url)
    assert not report.exists(), "the child started although the restore failed"
    assert tree(ck) == before, "a failed restore changed --dir"
    assert leftovers(tmp_path) == []

    store.server.start()
    res = _run(args, store, tmp_path)
    assert res.returncode == 0, res.stderr
    seen = read_report(report)
    assert seen["CKPT_RESTORED"]
    assert tree(ck) == tree(src)
    record("remote down mid-run (s3)", phase="restore")


#: Saves v1, waits for the go file, saves v2 and a weights file, exits 0.
TWO_STEPS = """
    import os, sys, time
    from pathlib import Path

    d = Path(os.environ["CKPT_DIR"])
    def save(name, data):
        tmp = d / (name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, d / name)
    save("state.txt", b"v1")
    go = Path(sys.argv[1])
    while not go.exists():
        time.sleep(0.05)
    save("weights.bin", bytes(range(256)) * 4096)
    save("state.txt", b"v2")
"""


def test_s3_down_during_the_final_flush_back_before_the_flush_timeout(
    store_of: Any, tmp_path: Path, running: list[Running]
) -> None:
    """Injected: the S3 server stops after the first snapshot; the child then
    saves its last state and exits 0, so the final flush runs against a dead
    server; the server comes back (same port, same data) well before
    --flush-timeout.
    Asserted: ckpt says the snapshot failed and waits, then exits 0 with the
    final state durable; a restore gives exactly the child's last state."""
    store: Store = store_of("s3-s3rver")
    assert store.server is not None and store.server.persistent
    objects = Objects(store.url, store.storage_options)
    child = write_script(tmp_path / "two_steps.py", TWO_STEPS)
    go = tmp_path / "go"
    ck = Running(
        [
            "run",
            "--dir",
            str(tmp_path / "ck"),
            "--remote",
            store.url,
            "--debounce",
            "0.2",
            "--backoff",
            "0",
            "--flush-timeout",
            "150",
            "--",
            PY,
            str(child),
            str(go),
        ],
        cwd=tmp_path,
        logs=tmp_path / "logs",
        name="ckpt",
        # botocore's own retries would outlast --io-timeout: ckpt's retries are the test
        env={**store.env, "CKPT_IO_TIMEOUT": "3", "AWS_MAX_ATTEMPTS": "1"},
    )
    running.append(ck)
    wait_for(objects.manifests, what="the first snapshot", proc=ck)

    store.server.stop()
    go.touch()
    wait_for(lambda: "attempt 1: exit code 0" in ck.stderr(), what="the child's exit", proc=ck)
    wait_for(
        lambda: "snapshot failed" in ck.stderr(),
        what="the final snapshot failing",
        timeout=90,
        proc=ck,
    )
    assert ck.proc.poll() is None, "ckpt gave up before --flush-timeout"
    store.server.start()
    assert ck.wait(180) == 0, ck.stderr()
    err = ck.stderr()
    assert "final state is durable" in err, err
    assert "unexpected error" not in err and "Traceback" not in err

    out = tmp_path / "out"
    _ok(["restore", store.url, str(out)], store, tmp_path)
    assert tree(out) == {
        "state.txt": ("file", b"v2"),
        "weights.bin": ("file", bytes(range(256)) * 4096),
    }
    record("remote down mid-run (s3)", phase="final flush")


# ---------------------------------------------------------------- read-only remote


def test_read_only_remote_refuses_writers_and_serves_readers(tmp_path: Path) -> None:
    """Injected: the remote directory (one snapshot in it) and an empty one
    become read-only (a read-only bind mount as root; chmod a-w otherwise).
    Asserted: `ckpt run` and `ckpt push` exit 69 with one error naming the
    remote, the child never starts, --dir and the remote are unchanged;
    `ckpt ls` and `ckpt restore` from it still work, byte for byte."""
    store = None  # a local remote: no credentials
    src = _files(tmp_path / "src", {"state.txt": b"v1", "sub/w.bin": os.urandom(300_000)})
    remote, empty = tmp_path / "remote", tmp_path / "empty-remote"
    empty.mkdir()
    _ok(["push", str(src), str(remote)], store, tmp_path)
    objects = Objects(f"file://{remote}")
    state = objects.state()
    ck = _files(tmp_path / "ck", {"local.txt": b"newer local work"})
    before = tree(ck)
    marker = tmp_path / "child-ran"
    child = [PY, "-c", f"open({str(marker)!r}, 'w')"]

    with read_only(remote), read_only(empty):
        assert not writable_probe(remote), "the remote is still writable"
        for args, where in (
            (["run", "--dir", str(ck), "--remote", str(remote), "--", *child], remote),
            (["run", "--dir", str(ck), "--remote", f"file://{remote}", "--", *child], remote),
            (["push", str(src), str(remote)], remote),
            (["push", str(src), str(empty)], empty),
            (["run", "--dir", str(ck), "--remote", str(empty), "--", *child], empty),
        ):
            res = _run(args, store, tmp_path)
            assert res.returncode == UNAVAILABLE, f"{args}: {res.stderr}"
            one_error(res, str(where))
            assert not marker.exists(), "the child started on a read-only remote"
            assert tree(ck) == before
            assert objects.state() == state
            assert not list(empty.iterdir())

        listed = _ok(["ls", str(remote), "--json"], store, tmp_path)
        assert len(json.loads(listed.stdout)["snapshots"]) == 1
        out = tmp_path / "out"
        _ok(["restore", str(remote), str(out)], store, tmp_path)
    assert tree(out) == tree(src)
    record("remote read-only", 5)


# ---------------------------------------------------------------- one garbage object

OLD = {"state.txt": b"old content, snapshot one\n"}
NEW = {"state.txt": b"new content, snapshot two (longer)\n", "other.bin": os.urandom(40_000)}
KINDS = ["file", "s3-moto"]


@pytest.fixture
def two_snapshots(
    request: pytest.FixtureRequest, store_of: Any, tmp_path: Path
) -> tuple[Store, Objects, str, str]:
    """A store (request.param kind) holding OLD then NEW; their manifest keys."""
    store: Store = store_of(request.param)
    src = _files(tmp_path / "src", OLD)
    k1 = _push(src, store, tmp_path)
    _files(src, NEW)
    k2 = _push(src, store, tmp_path)
    return store, Objects(store.url, store.storage_options), k1, k2


def _bytes(files: dict[str, bytes]) -> dict[str, tuple[str, bytes | str]]:
    return {k: ("file", v) for k, v in files.items()}


@pytest.mark.parametrize("two_snapshots", KINDS, indirect=True)
def test_garbage_chunk_makes_restore_use_the_previous_snapshot(
    two_snapshots: tuple[Store, Objects, str, str], tmp_path: Path
) -> None:
    """Injected: one chunk only the newest snapshot uses is overwritten with
    garbage of the same length (so only its hash betrays it).
    Asserted: restore exits 0 with the previous snapshot, whole, and one
    warning naming the damaged snapshot; nothing of the newest is restored."""
    store, objects, k1, k2 = two_snapshots
    m1, m2 = json.loads(objects.read(k1)), json.loads(objects.read(k2))
    old_chunks = {c for e in m1["entries"] for c in e.get("chunks", ())}
    target = next(c for e in m2["entries"] for c in e.get("chunks", ()) if c not in old_chunks)
    key = f"chunks/{target[:2]}/{target}"
    size = len(objects.read(key))
    objects.write(key, os.urandom(size))

    out = tmp_path / "out"
    res = _ok(["restore", store.url, str(out)], store, tmp_path)
    assert tree(out) == _bytes(OLD)
    warned = warnings(res.stderr)
    assert len(warned) == 1 and _snap_id(k2) in warned[0], res.stderr
    assert f"restored snapshot {_snap_id(k1)}" in res.stderr
    record("garbage object (chunk)", store=store.kind)


@pytest.mark.parametrize("two_snapshots", KINDS, indirect=True)
def test_garbage_newest_manifest_makes_restore_use_the_previous_snapshot(
    two_snapshots: tuple[Store, Objects, str, str], tmp_path: Path
) -> None:
    """Injected: the newest manifest is overwritten with bytes that are not JSON.
    Asserted: `ckpt ls` still lists both (the newest as damaged); restore and
    `ckpt run` on an empty dir use the previous snapshot, with a warning
    naming the damaged one."""
    store, objects, k1, k2 = two_snapshots
    objects.write(k2, b'\x00\x9f garbage {"entries": [')

    listed = json.loads(_ok(["ls", store.url, "--json"], store, tmp_path).stdout)["snapshots"]
    assert [(s["id"], s["ok"]) for s in listed] == [(_snap_id(k2), False), (_snap_id(k1), True)]
    out = tmp_path / "out"
    res = _ok(["restore", store.url, str(out)], store, tmp_path)
    assert tree(out) == _bytes(OLD)
    assert any(_snap_id(k2) in w for w in warnings(res.stderr)), res.stderr

    if store.kind != "file":
        record("garbage object (manifest)", store=store.kind)
        return  # `ckpt run` restores through the same code: checked on file:// only
    report = tmp_path / "report.json"
    res = _ok(
        [
            "run",
            "--dir",
            str(tmp_path / "ck"),
            "--remote",
            store.url,
            "--backoff",
            "0",
            "--",
            *reporter(tmp_path, report),
        ],
        store,
        tmp_path,
    )
    seen = read_report(report)
    assert seen["CKPT_RESTORED"] == _snap_id(k1)
    assert seen["files"] == {k: v.decode() for k, v in OLD.items()}
    assert any(_snap_id(k2) in w for w in warnings(res.stderr)), res.stderr
    record("garbage object (manifest)", store=store.kind)


GARBAGE_CONFIG = {
    "binary": b"\x00\xff\xfe not json at all",
    "truncated": b'{"format": "ckpt", "version": 1, "chunk_si',
    "not an object": b'["ckpt", 1]',
    "chunk_size true": b'{"format": "ckpt", "version": 1, "chunk_size": true, "hash": "sha256"}',
}


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_config_is_one_clear_error_that_changes_nothing(
    kind: str, store_of: Any, tmp_path: Path
) -> None:
    """Injected: ckpt.json replaced by garbage (binary, truncated JSON, a JSON
    array, a chunk_size of `true`).
    Asserted: restore, push, ls and run each exit 78 with one error naming
    the remote (and ckpt.json when it does not parse); the child never
    starts; --dir and every object of the remote are unchanged."""
    store: Store = store_of(kind)
    src = _files(tmp_path / "src", {"state.txt": b"v1"})
    _push(src, store, tmp_path)
    objects = Objects(store.url, store.storage_options)
    ck = _files(tmp_path / "ck", {"mine.txt": b"local"})
    before = tree(ck)
    marker = tmp_path / "child-ran"
    every = [
        ["restore", store.url, str(ck)],
        ["push", str(src), store.url],
        ["ls", store.url],
        [
            "run",
            "--dir",
            str(ck),
            "--remote",
            store.url,
            "--",
            PY,
            "-c",
            f"open({str(marker)!r}, 'w')",
        ],
    ]
    # Every command on the first kind of garbage, restore and push on the others
    # (on S3 only the first: the parsing is the same, the server is slow to reach).
    cases = list(GARBAGE_CONFIG.items())
    if kind != "file":
        cases = cases[:1]
    for i, (name, garbage) in enumerate(cases):
        objects.write("ckpt.json", garbage)
        state = objects.state()
        for args in every if i == 0 else every[:2]:
            res = _run(args, store, tmp_path)
            assert res.returncode == CONFIG, f"{name}: {args[0]}: {res.stderr}"
            what = "chunk_size" if "chunk_size" in name else "ckpt.json"
            one_error(res, objects.display, what)
            assert tree(ck) == before and not marker.exists()
            assert objects.state() == state, f"{name}: {args[0]} changed the remote"
    record("garbage object (ckpt.json)", len(cases), store=kind)


GARBAGE_LEASE = {
    "binary": b"\x00\xff\xfe",
    "truncated": b'{"owner": "run-1", "host": "elsewhere", "heartb',
    "not an object": b"[1, 2, 3]",
    "wrong types": b'{"owner": 7, "host": null, "pid": "x", "heartbeat": "soon", "ttl": []}',
    "NaN heartbeat": b'{"owner": "run-1", "host": "elsewhere", "pid": 1, "heartbeat": NaN, '
    b'"ttl": 60}',
}


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_lease_is_taken_over_as_stale(kind: str, store_of: Any, tmp_path: Path) -> None:
    """Injected: lease.json replaced by garbage (binary, truncated JSON, a
    JSON array, fields of the wrong type, a NaN heartbeat), as if a writer
    died mid-write or another tool scribbled on it.
    Asserted: the garbage lease is stale: `ckpt push` commits a snapshot for
    each kind of garbage, and `ckpt run` says it took the lease over, runs the
    child and makes its state durable; the lease is released afterwards."""
    store: Store = store_of(kind)
    objects = Objects(store.url, store.storage_options)
    src = _files(tmp_path / "src", {"state.txt": b"v0"})
    cases = list(GARBAGE_LEASE.values())
    if kind != "file":  # the same parsing; S3 is slow to reach: the worst two
        cases = [GARBAGE_LEASE["binary"], GARBAGE_LEASE["NaN heartbeat"]]
    for i, garbage in enumerate(cases):
        objects.write("lease.json", garbage)
        _files(src, {"state.txt": f"v{i + 1}".encode()})
        _push(src, store, tmp_path)
        assert "lease.json" not in objects.names(), "push did not release the lease"

    objects.write("lease.json", GARBAGE_LEASE["truncated"])
    write = "import os; open(os.environ['CKPT_DIR'] + '/state.txt', 'w').write('from run')"
    res = _ok(
        [
            "run",
            "--dir",
            str(tmp_path / "ck"),
            "--remote",
            store.url,
            "--debounce",
            "0.2",
            "--backoff",
            "0",
            "--",
            PY,
            "-c",
            write,
        ],
        store,
        tmp_path,
    )
    assert any("took over the lease" in w and "unreadable" in w for w in warnings(res.stderr)), (
        res.stderr
    )
    assert "lease.json" not in objects.names()
    out = tmp_path / "out"
    _ok(["restore", store.url, str(out)], store, tmp_path)
    assert tree(out) == {"state.txt": ("file", b"from run")}
    record("garbage object (lease)", len(cases) + 1, store=kind)
