"""The connection handling of presigned GETs (`backends.s3get`), against a
small HTTP server on 127.0.0.1 that answers the way servers do between
requests: it closes a kept-alive connection without a word, it answers
without a length, it refuses. The URL is the one presigning would give;
what presigning and s3fs do is tested against moto and s3rver in
test_s3_client.py and test_s3_wire.py."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from ckpt_cli.backends.s3get import S3Gets

BODY = bytes(range(256)) * 64


class _Server:
    """Answers each request on a connection with `answers[i]` (raw bytes),
    then, per `close_after`, closes the connection after that many answers."""

    def __init__(self, answers: list[bytes], close_after: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answers = answers
        self.close_after = close_after
        self.requests: list[str] = []
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rb")
            for _ in range(self.close_after):
                line = f.readline()
                if not line:
                    return
                self.requests.append(line.decode().split()[1])
                while f.readline() not in (b"\r\n", b""):
                    pass
                conn.sendall(self.answers[min(len(self.requests), len(self.answers)) - 1])


def _ok(body: bytes = BODY, *, length: bool = True) -> bytes:
    head = b"HTTP/1.1 200 OK\r\n"
    head += b"Content-Length: %d\r\n" % len(body) if length else b"Connection: close\r\n"
    return head + b"\r\n" + body


@pytest.fixture
def gets(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    def make(server: _Server) -> S3Gets:
        g = S3Gets(fs=None, client=None, context=None)
        url = f"http://127.0.0.1:{server.port}/bucket/chunks/ab/x?Signature=s&Expires=1"
        monkeypatch.setattr(g, "_presign", lambda *a: url)
        return g

    yield make


def test_a_kept_alive_connection_the_server_closed_is_replaced_at_once(gets: Any) -> None:
    """The server answers one request per connection and closes it without
    saying so: the second GET finds its connection dead, and is made again
    on a new one in the same call (no error, no retry of the caller's)."""
    server = _Server([_ok(), _ok()], close_after=1)
    g = gets(server)
    for _ in range(2):
        buf = bytearray(len(BODY))
        assert g.read_into("bucket", "chunks/ab/x", None, memoryview(buf), 10.0) == len(BODY)
        assert bytes(buf) == BODY
    assert server.connections >= 2 and len(server.requests) == 2
    assert not g.off


def test_a_connection_kept_alive_serves_the_next_get(gets: Any) -> None:
    server = _Server([_ok(), _ok()], close_after=2)
    g = gets(server)
    for _ in range(2):
        buf = bytearray(len(BODY))
        assert g.read_into("bucket", "chunks/ab/x", None, memoryview(buf), 10.0) == len(BODY)
    assert server.connections == 1


@pytest.mark.parametrize(
    ("answer", "off"),
    [
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 301 Moved Permanently\r\nContent-Length: 0\r\n\r\n", True),
        (_ok(length=False), True),
    ],
    ids=["missing", "busy", "refused", "another region", "no length"],
)
def test_an_answer_but_a_whole_200_is_left_to_the_client(
    gets: Any, answer: bytes, off: bool
) -> None:
    """None: the caller asks the client, whose errors are the usual ones.
    A missing object or a busy server is about this GET only; a refusal, a
    redirect, a body of no stated length turn the presigned path off."""
    g = gets(_Server([answer], close_after=1))
    buf = bytearray(len(BODY))
    assert g.read_into("bucket", "chunks/ab/x", None, memoryview(buf), 10.0) is None
    assert g.off is off
    assert bytes(buf) == bytes(len(BODY)), "nothing written into the view"


def test_an_object_of_another_size_is_reported_not_read(gets: Any) -> None:
    g = gets(_Server([_ok(BODY + b"extra")], close_after=1))
    buf = bytearray(len(BODY))
    assert g.read_into("bucket", "chunks/ab/x", None, memoryview(buf), 10.0) == len(BODY) + 5
    assert bytes(buf) == bytes(len(BODY))


def test_a_body_cut_short_is_a_failed_try(gets: Any) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY[:100]
    g = gets(_Server([answer], close_after=1))
    with pytest.raises(OSError):
        g.read_into("bucket", "chunks/ab/x", None, memoryview(bytearray(len(BODY))), 10.0)
