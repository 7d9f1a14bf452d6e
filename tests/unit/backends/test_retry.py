"""RetryingBackend around a scripted inner backend: which failures are tried
again, when the connection is built afresh, how long it waits (a recorded
sleep, no sleeping) and the one line the last failure becomes."""

from __future__ import annotations

import pytest

from ckpt_cli.backends import NotFound
from ckpt_cli.backends.retry import ATTEMPTS, DELAY_CAP, RetryingBackend, connect_retrying
from ckpt_cli.errors import RemoteError


class Scripted:
    """An inner backend whose reads fail with the scripted exceptions, in
    order, then answer; it counts its connections."""

    exclusive_create = False
    borrows_buffers = True
    reads_into = True
    local_io = True

    def __init__(self, *failures: BaseException) -> None:
        self.display = "s3://bucket/run"
        self.failures = list(failures)
        self.tries = 0
        self.connection: object = object()
        self.reconnects = 0

    def reconnect(self, stale: object) -> None:
        if stale is self.connection:
            self.connection = object()
            self.reconnects += 1

    def read(self, key: str) -> bytes:
        self.tries += 1
        if self.failures:
            raise self.failures.pop(0)
        return b"data of " + key.encode()


def _backend(inner: Scripted, slept: list[float]) -> RetryingBackend:
    return RetryingBackend(inner, io_timeout=7, sleep=slept.append)  # type: ignore[arg-type]


def test_a_call_that_fails_then_answers_is_tried_again() -> None:
    slept: list[float] = []
    inner = Scripted(OSError("reset"), OSError("reset"), OSError("reset"))
    assert _backend(inner, slept).read("k") == b"data of k"
    assert inner.tries == ATTEMPTS
    assert len(slept) == ATTEMPTS - 1 and all(0 < s <= DELAY_CAP for s in slept)
    assert inner.reconnects == 1, "a new connection before the last try"


def test_the_last_failure_is_one_line_naming_the_call_and_the_tries() -> None:
    slept: list[float] = []
    inner = Scripted(*[ConnectionError("refused\nmore")] * ATTEMPTS)
    with pytest.raises(RemoteError) as err:
        _backend(inner, slept).read("chunks/ab/x")
    assert str(err.value) == (
        f"reading chunks/ab/x on s3://bucket/run failed after {ATTEMPTS} tries: "
        "ConnectionError: refused"
    )
    assert inner.tries == ATTEMPTS and inner.reconnects == 1


def test_a_timeout_names_the_io_timeout() -> None:
    inner = Scripted(*[TimeoutError()] * ATTEMPTS)
    with pytest.raises(
        RemoteError, match=r"no answer within 7s \(--io-timeout / CKPT_IO_TIMEOUT\)"
    ):
        _backend(inner, []).read("k")


def test_rejected_credentials_are_read_again_once_without_waiting() -> None:
    slept: list[float] = []
    inner = Scripted(PermissionError("ExpiredToken"))
    assert _backend(inner, slept).read("k") == b"data of k"
    assert (inner.tries, inner.reconnects, slept) == (2, 1, [])
    inner = Scripted(PermissionError("ExpiredToken"), PermissionError("ExpiredToken"))
    with pytest.raises(RemoteError, match=r"failed after 2 tries \(check the credentials\)"):
        _backend(inner, slept).read("k")
    assert inner.tries == 2 and slept == []


@pytest.mark.parametrize(
    "answer", [NotFound("k"), FileNotFoundError("k"), RemoteError("the bucket does not exist")]
)
def test_an_answer_passes_through_at_once(answer: Exception) -> None:
    slept: list[float] = []
    inner = Scripted(answer)
    with pytest.raises(type(answer)):
        _backend(inner, slept).read("k")
    assert inner.tries == 1 and slept == [] and inner.reconnects == 0


def test_capabilities_are_the_inner_backends() -> None:
    backend = _backend(Scripted(), [])
    assert (
        backend.exclusive_create,
        backend.borrows_buffers,
        backend.reads_into,
        backend.local_io,
    ) == (False, True, True, True)
    assert backend.display == "s3://bucket/run"


def test_connecting_is_tried_like_a_call_unless_the_credentials_are_wrong() -> None:
    slept: list[float] = []
    tries: list[int] = []

    def connect() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise RemoteError("remote x could not be opened (is it reachable?): refused")
        return "fs"

    assert connect_retrying(connect, slept.append) == "fs"
    assert len(tries) == 3 and len(slept) == 2

    def rejected() -> str:
        tries.append(1)
        raise RemoteError("remote x could not be opened (check the credentials): denied")

    tries.clear()
    with pytest.raises(RemoteError, match="check the credentials"):
        connect_retrying(rejected, slept.append)
    assert len(tries) == 1
