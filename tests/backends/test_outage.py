"""What cloud use needs from a remote that misbehaves, shown with real servers
and the real binary:

- the S3 server stops mid-run and starts again: snapshots wait (newest wins),
  the console says so, they catch up, nothing committed is lost, no crash;
- the S3 server stalls (SIGSTOP): every call times out, the final flush gives
  up at --flush-timeout instead of hanging, and the local state is kept;
- session credentials expire mid-run and new ones appear in the credentials
  file: ckpt reads them again and goes on;
- throttling (503 SlowDown), 500s and dropped connections on a third of all
  requests: push and restore still succeed, byte for byte.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import run_ckpt, write_script
from integration._util import Running, wait_for
from stores import _SAFETY_ENV as SAFETY_ENV
from stores import Store

pytestmark = pytest.mark.slow

SAFE_ENV = dict(SAFETY_ENV)

#: A trainer that saves its step every 0.3 s (temp + rename) until told to stop,
#: then records the last step it saved outside the checkpoint directory.
WRITER = """
    import os, sys, time
    from pathlib import Path

    d = Path(os.environ["CKPT_DIR"])
    stop = Path(sys.argv[1])
    last = Path(sys.argv[2])
    d.mkdir(parents=True, exist_ok=True)
    step = 0
    state = d / "state.txt"
    if state.exists():
        step = int(state.read_text())
    while True:
        step += 1
        tmp = d / "state.txt.tmp"
        tmp.write_text(str(step))
        os.replace(tmp, state)
        (d / "weights.bin.tmp").write_bytes(os.urandom(64 * 1024))
        os.replace(d / "weights.bin.tmp", d / "weights.bin")
        if stop.exists():
            last.write_text(str(step))
            break
        time.sleep(0.3)
"""


def _spawn(tmp_path: Path, store_url: str, env: dict[str, str], *flags: str) -> Running:
    child = write_script(tmp_path / "writer.py", WRITER)
    args = [
        "run",
        "--dir",
        str(tmp_path / "ck"),
        "--remote",
        store_url,
        "--debounce",
        "0.2",
        "--backoff",
        "0",
        *flags,
        "--",
        sys.executable,
        str(child),
        str(tmp_path / "stop"),
        str(tmp_path / "last"),
    ]
    return Running(args, cwd=tmp_path, logs=tmp_path / "logs", name="ckpt", env=env)


def _snapshots(url: str, cwd: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    res = run_ckpt(["ls", url, "--json"], cwd=cwd, env=env, timeout=120)
    if res.returncode != 0:
        return []
    snaps: list[dict[str, Any]] = json.loads(res.stdout)["snapshots"]
    return snaps


def _restore(url: str, dest: Path, cwd: Path, env: dict[str, str], snapshot: str) -> None:
    res = run_ckpt(
        ["restore", url, str(dest), "--snapshot", snapshot], cwd=cwd, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        r.cleanup()


def test_s3_server_down_mid_run_then_back_loses_nothing(
    store_of: Any, tmp_path: Path, running: list[Running]
) -> None:
    store: Store = store_of("s3-s3rver")  # keeps its objects across a restart
    assert store.server is not None and store.server.persistent
    env = {**SAFE_ENV, **store.env, "CKPT_IO_TIMEOUT": "5"}
    ck = _spawn(tmp_path, store.url, env, "--flush-timeout", "120")
    running.append(ck)
    first = wait_for(
        lambda: _snapshots(store.url, tmp_path, env), what="a first durable snapshot", proc=ck
    )

    store.server.stop()
    # The outage may first hit the retention that follows a snapshot (its own
    # --io-timeout retries, about 20 s here) before the next snapshot fails.
    wait_for(
        lambda: "snapshot failed" in ck.stderr(), what="the outage reported", timeout=90, proc=ck
    )
    assert "the newest" in ck.stderr(), "the console says that only the newest waits"
    store.server.start()
    wait_for(lambda: "remote answers again" in ck.stderr(), what="catching up", timeout=90, proc=ck)
    (tmp_path / "stop").touch()
    assert ck.wait(180) == 0, ck.stderr()
    assert "unexpected error" not in ck.stderr()

    snaps = _snapshots(store.url, tmp_path, env)
    assert snaps and snaps[0]["generation"] > first[0]["generation"]
    last_step = (tmp_path / "last").read_text()
    newest = tmp_path / "newest"
    _restore(store.url, newest, tmp_path, env, snaps[0]["id"])
    assert (newest / "state.txt").read_text() == last_step, "the final state is durable"
    for s in snaps[1:]:  # every kept snapshot is whole and restorable
        _restore(store.url, tmp_path / f"r-{s['id']}", tmp_path, env, s["id"])


def test_stalled_s3_server_times_out_and_the_flush_gives_up(
    store_of: Any, tmp_path: Path, running: list[Running]
) -> None:
    store: Store = store_of("s3-moto")
    assert store.server is not None
    env = {**SAFE_ENV, **store.env, "CKPT_IO_TIMEOUT": "2"}
    ck = _spawn(tmp_path, store.url, env, "--flush-timeout", "10")
    running.append(ck)
    wait_for(lambda: _snapshots(store.url, tmp_path, env), what="a first snapshot", proc=ck)
    store.server.pause()
    try:
        (tmp_path / "stop").touch()
        status = ck.wait(120)  # a hang here is the bug this test exists for
    finally:
        store.server.resume()
    assert status == 69, ck.stderr()
    err = ck.stderr()
    assert "not durable" in err
    assert "no answer within 2s" in err, err
    assert "unexpected error" not in err
    last_step = (tmp_path / "last").read_text()
    assert (tmp_path / "ck" / "state.txt").read_text() == last_step, "the local state is kept"


# ------------------------------------------------------------ expiring credentials


class _Gate(http.server.ThreadingHTTPServer):
    """A reverse proxy in front of the S3 server that misbehaves like the real
    thing can: it answers ExpiredToken for requests signed with an expired
    session token (as AWS does once STS credentials run out), and, when
    `faults` is set, answers every 3rd request with 503 SlowDown, every 4th
    with 500 InternalError and drops the connection of every 7th without an
    answer. Everything else is forwarded untouched."""

    daemon_threads = True

    def __init__(self, upstream_port: int, *, faults: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _GateHandler)
        self.upstream_port = upstream_port
        self.faults = faults
        self.expired: set[str] = set()
        self.accepted: list[str] = []
        self.rejected: list[str] = []
        self.injected: dict[str, int] = {"503": 0, "500": 0, "reset": 0}
        self.requests = 0
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port

    def decide(self, token: str) -> str:
        with self.lock:
            self.requests += 1
            n = self.requests
            if token in self.expired:
                self.rejected.append(token)
                return "expired"
            fault = ""
            if self.faults:
                fault = (
                    "reset" if n % 7 == 0 else "503" if n % 3 == 0 else "500" if n % 4 == 0 else ""
                )
            if fault:
                self.injected[fault] += 1
                return fault
            self.accepted.append(token)
            return "forward"


_ERRORS = {
    "expired": (400, "ExpiredToken", "The provided token has expired."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
}


class _GateHandler(http.server.BaseHTTPRequestHandler):
    server: _Gate
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        action = self.server.decide(self.headers.get("X-Amz-Security-Token", ""))
        if action == "reset":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if action in _ERRORS:
            status, code, message = _ERRORS[action]
            payload = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>{message}</Message></Error>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


@contextlib.contextmanager
def _gate(upstream_port: int, *, faults: bool = False) -> Iterator[_Gate]:
    gate = _Gate(upstream_port, faults=faults)
    threading.Thread(target=gate.serve_forever, daemon=True).start()
    try:
        yield gate
    finally:
        gate.shutdown()
        gate.server_close()


def test_throttling_5xx_and_dropped_connections_are_retried(store_of: Any, tmp_path: Path) -> None:
    """Through a proxy that answers a third of all requests with 503 SlowDown,
    a quarter with 500 and drops every 7th connection, `ckpt push` and
    `ckpt restore` of a multi-chunk directory both succeed, byte for byte."""
    store: Store = store_of("s3-moto")
    assert store.server is not None
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    files = {"a.bin": os.urandom(9 * 1024 * 1024), "sub/b.bin": os.urandom(3 * 1024 * 1024)}
    for name, content in files.items():
        (src / name).write_bytes(content)
    with _gate(store.server.port, faults=True) as gate:
        env = {
            **SAFE_ENV,
            **store.env,
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{gate.port}",
            "CKPT_IO_TIMEOUT": "20",
        }
        pushed = run_ckpt(["push", str(src), store.url], cwd=tmp_path, env=env, timeout=300)
        assert pushed.returncode == 0, pushed.stderr
        restored = run_ckpt(
            ["restore", store.url, str(tmp_path / "out")], cwd=tmp_path, env=env, timeout=300
        )
        assert restored.returncode == 0, restored.stderr
        with gate.lock:
            injected = dict(gate.injected)
    for name, content in files.items():
        assert (tmp_path / "out" / name).read_bytes() == content
    assert all(injected.values()), f"every kind of fault was injected at least once: {injected}"
    for res in (pushed, restored):
        assert "unexpected error" not in res.stderr
        assert "Traceback" not in res.stderr


def _write_credentials(path: Path, token: str) -> None:
    path.write_text(
        "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
        f"aws_session_token = {token}\n"
    )


def test_expired_session_credentials_are_read_again(
    store_of: Any, tmp_path: Path, running: list[Running]
) -> None:
    store: Store = store_of("s3-moto")  # moto accepts any signature; the gate checks tokens
    assert store.server is not None
    with _gate(store.server.port) as gate:
        creds = tmp_path / "credentials"
        _write_credentials(creds, "token-1")
        env = {
            **SAFE_ENV,
            "CKPT_IO_TIMEOUT": "10",
            "AWS_SHARED_CREDENTIALS_FILE": str(creds),
            "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{gate.port}",
        }
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            assert not os.environ.get(name), f"only the credentials file may supply {name}"
        ck = _spawn(tmp_path, store.url, env)
        running.append(ck)
        first = wait_for(
            lambda: _snapshots(store.url, tmp_path, env),
            what="a first snapshot with token-1",
            proc=ck,
        )
        with gate.lock:
            gate.expired.add("token-1")
        _write_credentials(creds, "token-2")  # what a credential helper does on refresh
        wait_for(
            lambda: any(
                s["generation"] > first[0]["generation"]
                for s in _snapshots(store.url, tmp_path, env)
            ),
            what="a snapshot uploaded with the refreshed token",
            timeout=60,
            proc=ck,
        )
        (tmp_path / "stop").touch()
        assert ck.wait(120) == 0, ck.stderr()
    with gate.lock:
        assert "token-1" in gate.rejected, "the expired token was refused at least once"
        assert "token-2" in gate.accepted
    assert "unexpected error" not in ck.stderr()
    assert "token-1" not in ck.stderr() and "token-2" not in ck.stderr()
