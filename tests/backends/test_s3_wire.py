"""How chunks travel to and from an S3 server, seen on the wire: the real
binary behind a recording proxy in front of the test-suite's servers (moto,
and s3rver, which checks a signature's key id; neither checks its value).

- a restore gets each chunk with one GET (no HEAD for its size first) and
  does not ask the server for its checksum (the chunk's BLAKE3 name is
  checked instead);
- a push sends each chunk once, as it is: no CRC32 of it, no SHA-256 of the
  payload for the signature, no `Expect: 100-continue` round trip;
- a chunk GET that stalls mid-body beyond --io-timeout is abandoned and
  retried, and the restore is whole;
- a rank's chunk whose bytes arrive wrong once is read again before its part
  of the step is marked damaged: whole the second time, nothing is marked;
- the repository's own small objects are read with one GET each (no HEAD
  for their size, none for a missing one) and a prefix with nothing under
  it yet is listed with one request (s3fs's find adds a HEAD and a second
  listing to an empty answer): on a real store each round trip is tens of
  milliseconds before the child can start.

The backend's own contract for `read_into` and the S3 client it opens
(pool size, checksum settings) is tested in-process in test_s3_client.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CKPT, run_ckpt
from stores import _SAFETY_ENV as SAFETY_ENV
from stores import Store

pytestmark = pytest.mark.slow

S3_KINDS = ["s3-moto", "s3-s3rver"]
#: Two files: one of two chunks (8 MiB + a tail), one of a single chunk.
FILES = {"weights.bin": 9 * 1024 * 1024 + 321, "sub/opt.bin": 1024 * 1024 + 7}


class _Recorder(http.server.ThreadingHTTPServer):
    """A reverse proxy that records every request (method, path, headers)
    and forwards it untouched; with `stall` set, the first GET of a chunk
    sends half its body, then nothing for `stall` seconds, then drops the
    connection (a peer that stops answering mid-transfer)."""

    daemon_threads = True

    def __init__(
        self,
        upstream_port: int,
        *,
        stall: float = 0.0,
        refuse_presigned: bool = False,
        flip: str = "",
    ) -> None:
        super().__init__(("127.0.0.1", 0), _RecorderHandler)
        #: Flip one byte of the body of the first GET whose path holds this
        #: (a transfer that delivers bad bytes once).
        self.flip = flip
        self.flipped: list[str] = []
        self.upstream_port = upstream_port
        self.stall = stall
        #: Answer 403 to every GET signed in its query (a server, or a proxy,
        #: that takes no presigned URL), without asking the server.
        self.refuse_presigned = refuse_presigned
        self.stalled: list[str] = []
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        #: (method, path with its query) of every request, in order.
        self.raw: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port

    def chunk_requests(self, method: str) -> list[tuple[str, dict[str, str]]]:
        with self.lock:
            return [(p, h) for m, p, h in self.seen if m == method and "/chunks/" in p]

    def should_flip(self, method: str, path: str) -> bool:
        with self.lock:
            if self.flip and method == "GET" and self.flip in path and not self.flipped:
                self.flipped.append(path)
                return True
            return False

    def should_stall(self, method: str, path: str) -> bool:
        with self.lock:
            if self.stall and method == "GET" and "/chunks/" in path and not self.stalled:
                self.stalled.append(path)
                return True
            return False


class _RecorderHandler(http.server.BaseHTTPRequestHandler):
    server: _Recorder
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        path = self.path.split("?", 1)[0]
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.server.lock:
            self.server.seen.append((self.command, path, headers))
            self.server.raw.append((self.command, self.path))
        length = int(self.headers.get("Content-Length") or 0)
        if self.server.refuse_presigned and _presigned(self.path):
            self.send_response(403, "Forbidden")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if headers.get("expect", "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()
        body = self.rfile.read(length) if length else b""
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        forward = {
            k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")
        }
        conn.request(self.command, self.path, body=body, headers=forward)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        stall = self.server.should_stall(self.command, path)
        if data and resp.status == 200 and self.server.should_flip(self.command, path):
            data = bytes([data[0] ^ 0x01]) + data[1:]
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if stall:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            time.sleep(self.server.stall)
            self.close_connection = True
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


def _presigned(path_and_query: str) -> bool:
    """A request signed in its query (SigV2 `Signature=`, SigV4
    `X-Amz-Signature=`): a presigned URL."""
    query = path_and_query.partition("?")[2]
    return any(p.startswith(("Signature=", "X-Amz-Signature=")) for p in query.split("&"))


@contextlib.contextmanager
def _proxy(
    store: Store, *, stall: float = 0.0, refuse_presigned: bool = False, flip: str = ""
) -> Iterator[_Recorder]:
    assert store.server is not None
    proxy = _Recorder(store.server.port, stall=stall, refuse_presigned=refuse_presigned, flip=flip)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


def _env(store: Store, proxy: _Recorder, timeout: str = "30") -> dict[str, str]:
    return {
        **SAFETY_ENV,
        **store.env,
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{proxy.port}",
        "CKPT_IO_TIMEOUT": timeout,
    }


def _source(root: Path) -> dict[str, bytes]:
    made = {}
    for i, (name, size) in enumerate(sorted(FILES.items())):
        data = hashlib.sha256(str(i).encode()).digest() * (size // 32 + 1)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[:size])
        made[name] = data[:size]
    return made


def _push(store: Store, tmp_path: Path, env: dict[str, str]) -> dict[str, bytes]:
    made = _source(tmp_path / "src")
    res = run_ckpt(["push", str(tmp_path / "src"), store.url], cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    return made


def _push_then_restore(
    store: Store, tmp_path: Path, proxy: _Recorder
) -> tuple[Any, dict[str, bytes], list[tuple[str, str]], list[tuple[str, str, dict[str, str]]]]:
    """Push the source through the proxy, then restore it into out/: (the
    restore's result, what was pushed, the restore's requests as
    (method, path with query), and as (method, path, headers))."""
    env = _env(store, proxy)
    made = _push(store, tmp_path, env)
    with proxy.lock:
        start = len(proxy.raw)
    res = run_ckpt(
        ["restore", store.url, str(tmp_path / "out")], cwd=tmp_path, env=env, timeout=300
    )
    with proxy.lock:
        return res, made, proxy.raw[start:], proxy.seen[start:]


def _restored(tmp_path: Path, made: dict[str, bytes]) -> None:
    for name, data in made.items():
        assert (tmp_path / "out" / name).read_bytes() == data, name


@pytest.mark.parametrize("kind", S3_KINDS)
def test_push_sends_each_chunk_as_it_is(kind: str, store_of: Any, tmp_path: Path) -> None:
    """No CRC32 header, no SHA-256 of the payload, no 100-continue: the chunk
    is named by its BLAKE3 hash, which every read checks (s3rver checks the
    signature, so an unsigned payload is accepted by a signing server)."""
    store: Store = store_of(kind)
    with _proxy(store) as proxy:
        _push(store, tmp_path, _env(store, proxy))
        puts = proxy.chunk_requests("PUT")
    assert len(puts) == 3, [p for p, _ in puts]  # 2 + 1 chunks, each sent once
    for path, headers in puts:
        assert headers.get("x-amz-content-sha256") == "UNSIGNED-PAYLOAD", (path, headers)
        assert not [h for h in headers if h.startswith("x-amz-checksum")], (path, headers)
        assert "content-md5" not in headers, (path, headers)
        assert "expect" not in headers, (path, headers.get("content-length"))


@pytest.mark.parametrize("kind", S3_KINDS)
def test_restore_gets_each_chunk_with_one_request(kind: str, store_of: Any, tmp_path: Path) -> None:
    store: Store = store_of(kind)
    with _proxy(store) as proxy:
        env = _env(store, proxy)
        made = _push(store, tmp_path, env)
        res = run_ckpt(
            ["restore", store.url, str(tmp_path / "out")], cwd=tmp_path, env=env, timeout=300
        )
        assert res.returncode == 0, res.stderr
        gets, heads = proxy.chunk_requests("GET"), proxy.chunk_requests("HEAD")
    _restored(tmp_path, made)
    assert heads == [], "no request for a chunk's size before its GET"
    assert sorted(p for p, _ in gets) == sorted({p for p, _ in gets}), "each chunk got once"
    assert len(gets) == 3
    for path, headers in gets:
        assert "x-amz-checksum-mode" not in headers, (path, headers)


@pytest.mark.parametrize("kind", S3_KINDS)
def test_restore_gets_chunks_by_presigned_url(kind: str, store_of: Any, tmp_path: Path) -> None:
    """Each chunk is one GET of a presigned URL from the thread that writes
    it (the signature in the query, no Authorization header: no event loop
    between the socket and the chunk buffer). With credentials and an
    endpoint from the environment, ckpt.json, the manifests and the
    listings are too (`s3direct`: no SDK in the restore at all)."""
    store: Store = store_of(kind)
    with _proxy(store) as proxy:
        res, made, asked, seen = _push_then_restore(store, tmp_path, proxy)
    assert res.returncode == 0, res.stderr
    _restored(tmp_path, made)
    chunks = [p for m, p in asked if m == "GET" and "/chunks/" in p]
    assert len(chunks) == 3 and all(_presigned(p) for p in chunks), chunks
    assert {m for m, _p in asked} == {"GET"}, asked
    assert all(_presigned(p) for _m, p in asked), asked
    for method, path, headers in seen:
        assert "authorization" not in headers, (method, path)
    metadata = [p for _m, p in asked if p.split("?")[0].endswith(".json")]
    assert metadata, asked


@pytest.mark.parametrize("kind", S3_KINDS)
def test_a_refused_presigned_url_falls_back_to_the_client(
    kind: str, store_of: Any, tmp_path: Path
) -> None:
    """A store (or a proxy on the way) that answers 403 to a presigned URL:
    that chunk and every later one are got with the client's own signed
    requests, the presigned path is tried once, the restore is whole and
    nothing is said about it."""
    store: Store = store_of(kind)
    with _proxy(store, refuse_presigned=True) as proxy:
        res, made, asked, _seen = _push_then_restore(store, tmp_path, proxy)
    assert res.returncode == 0, res.stderr
    _restored(tmp_path, made)
    chunks = [p for m, p in asked if m == "GET" and "/chunks/" in p]
    presigned = [p for p in chunks if _presigned(p)]
    assert 1 <= len(presigned) <= 4, chunks  # one per thread at most, then off
    assert len(chunks) - len(presigned) == 3, chunks
    direct = [p for m, p in asked if "/chunks/" not in p and _presigned(p)]
    assert len(direct) == 1, f"the direct path tried once, then the client: {asked}"
    assert "Traceback" not in res.stderr, res.stderr
    # The status as a word: a snapshot id may hold the digits "403".
    assert not re.search(r"\b403\b|Forbidden", res.stderr), res.stderr


def test_a_chunk_get_that_stalls_mid_body_is_retried(store_of: Any, tmp_path: Path) -> None:
    """--io-timeout bounds the streamed read too: the stalled GET is cut off
    (nothing it still delivers lands in the chunk's buffer) and the chunk is
    got again; the restore is byte for byte."""
    store: Store = store_of("s3-moto")
    with _proxy(store, stall=6.0) as proxy:
        env = _env(store, proxy, timeout="2")
        made = _push(store, tmp_path, env)
        res = run_ckpt(
            ["restore", store.url, str(tmp_path / "out")], cwd=tmp_path, env=env, timeout=300
        )
        gets = proxy.chunk_requests("GET")
        stalled = list(proxy.stalled)
    assert res.returncode == 0, res.stderr
    _restored(tmp_path, made)
    assert len(stalled) == 1
    assert [p for p, _ in gets].count(stalled[0]) == 2, "the stalled chunk was got again"
    assert "Traceback" not in res.stderr


def test_a_rank_part_that_arrives_corrupt_once_is_not_marked_damaged(
    store_of: Any, tmp_path: Path
) -> None:
    """A chunk of rank 1's part of the newest step whose bytes arrive wrong
    once (the store holds them whole): the restore says so and exits 69, to
    be retried; it marks nothing, so the retry, and every other rank, still
    restore the newest step (a corrupt chunk the store really holds sends
    every rank back a step: tests/multinode/test_damaged_step.py)."""
    store: Store = store_of("s3-moto")
    env = {**SAFETY_ENV, **store.env}
    script = " && ".join(
        f'printf "rank $CKPT_RANK step {s} %0100000d" 0 > "$CKPT_DIR/w.bin"'
        f' && "$0" commit --step {s}'
        for s in (10, 20)
    )
    for rank in (0, 1):
        res = run_ckpt(
            ["run", "--rank", str(rank), "--world-size", "2", "--dir",
             str(tmp_path / f"made-{rank}"), "--remote", store.url, "--",
             "sh", "-c", script, str(CKPT)],
            cwd=tmp_path, env=env, timeout=120,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr

    def restore(dest: str, proxy: _Recorder) -> Any:
        return run_ckpt(
            ["restore", store.url, str(tmp_path / dest), "--rank", "1", "--world-size", "2"],
            cwd=tmp_path, env=_env(store, proxy), timeout=120,
        )  # fmt: skip

    # The restore's first chunk GET is that of rank 1's part of step 20 (one chunk).
    with _proxy(store, flip="/chunks/") as proxy:
        first = restore("first", proxy)
        flipped = list(proxy.flipped)
        again = restore("again", proxy)
    assert flipped, "the proxy never saw the chunk"
    assert first.returncode == 69, first.stderr
    assert "whole when read again" in first.stderr, first.stderr
    assert not (tmp_path / "first").exists()
    assert "suspect" not in first.stderr, first.stderr
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "w.bin").read_bytes().startswith(b"rank 1 step 20 ")
    doc = json.loads(run_ckpt(["ls", store.url, "--json"], cwd=tmp_path, env=env).stdout)
    assert doc["complete_steps"][0] == 20, doc["complete_steps"]


@pytest.mark.parametrize("kind", S3_KINDS)
def test_a_restore_asks_each_question_once(kind: str, store_of: Any, tmp_path: Path) -> None:
    """ckpt.json and the manifest: one GET each, no HEAD before; suspect/,
    empty: one listing, no HEAD of the prefix, no second listing."""
    store: Store = store_of(kind)
    with _proxy(store) as proxy:
        res, made, asked, _seen = _push_then_restore(store, tmp_path, proxy)
    assert res.returncode == 0, res.stderr
    _restored(tmp_path, made)
    assert [p for m, p in asked if m == "HEAD"] == [], asked
    metadata = [p.split("?")[0] for m, p in asked if m == "GET" and ".json" in p.split("?")[0]]
    assert len(metadata) == len(set(metadata)) == 2, metadata  # ckpt.json, the manifest
    suspect = [p for m, p in asked if m == "GET" and "suspect" in p]
    assert len(suspect) == 1, suspect
    assert "delimiter=%2F" not in suspect[0], suspect  # every key below it, in one listing
