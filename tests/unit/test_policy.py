"""Restart policy: --retry-on parsing, matching, decisions, backoff, child exits."""

from __future__ import annotations

import os
import random
import signal
import sys

import pytest

from ckpt_cli.errors import ConfigError
from ckpt_cli.policy import (
    DEFAULT_RETRY_ON,
    Backoff,
    ChildExit,
    Decision,
    RetryOn,
    decide,
    parse_backoff,
    parse_retry_on,
)

SIGKILL = int(signal.SIGKILL)
SIGTERM = int(signal.SIGTERM)
SIGINT = int(signal.SIGINT)
SIGSEGV = int(signal.SIGSEGV)

# ---------------------------------------------------------------- parse_retry_on


def test_parse_codes() -> None:
    r = parse_retry_on("1,75,255")
    assert r.codes == frozenset({1, 75, 255})
    assert r.signals == frozenset()
    assert not r.any_signal
    assert not r.any_code


def test_parse_spaces_and_empty_tokens() -> None:
    r = parse_retry_on(" 1 , 2,,3 ")
    assert r.codes == frozenset({1, 2, 3})


@pytest.mark.parametrize("token", ["SIGKILL", "KILL", "kill", "sigkill", "SigKill"])
def test_parse_signal_names_with_and_without_prefix(token: str) -> None:
    r = parse_retry_on(token)
    assert r.signals == frozenset({SIGKILL})
    assert r.codes == frozenset()
    assert not r.any_signal


def test_parse_mixed_codes_and_signals() -> None:
    r = parse_retry_on("3,SIGTERM,SEGV")
    assert r.codes == frozenset({3})
    assert r.signals == frozenset({SIGTERM, SIGSEGV})


def test_parse_signals_keyword() -> None:
    r = parse_retry_on("signals")
    assert r.any_signal
    assert not r.any_code
    assert r.codes == frozenset()


def test_parse_any() -> None:
    r = parse_retry_on("any")
    assert r.any_signal
    assert r.any_code


@pytest.mark.parametrize("spec", ["none", "NONE", "", " "])
def test_parse_none_matches_nothing(spec: str) -> None:
    r = parse_retry_on(spec)
    assert r == RetryOn()
    assert not r.matches(ChildExit(code=1))
    assert not r.matches(ChildExit(code=75))
    assert not r.matches(ChildExit(signal=SIGKILL))


def test_parse_default_is_75_and_signals() -> None:
    r = parse_retry_on("default")
    assert r.codes == frozenset({75})
    assert r.any_signal
    assert not r.any_code
    assert r == parse_retry_on(DEFAULT_RETRY_ON)


def test_parse_default_combines_with_more() -> None:
    r = parse_retry_on("default,1,SIGINT")
    assert r.codes == frozenset({1, 75})
    assert r.signals == frozenset({SIGINT})
    assert r.any_signal


@pytest.mark.parametrize("spec", ["0", "256", "1000", "bogus", "SIGBOGUS", "1,bogus", "-1", "1.5"])
def test_parse_errors(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_retry_on(spec)


def test_parse_error_names_the_token() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        parse_retry_on("75,bogus")
    with pytest.raises(ConfigError, match="256"):
        parse_retry_on("256")


# ---------------------------------------------------------------- RetryOn.matches


def test_default_set_matches_75_and_signals_but_not_sigint() -> None:
    r = parse_retry_on(DEFAULT_RETRY_ON)
    assert r.matches(ChildExit(code=75))
    assert r.matches(ChildExit(signal=SIGKILL))
    assert r.matches(ChildExit(signal=SIGSEGV))
    assert r.matches(ChildExit(signal=SIGTERM))
    assert not r.matches(ChildExit(signal=SIGINT))
    assert not r.matches(ChildExit(code=1))
    assert not r.matches(ChildExit(code=0))
    assert not r.matches(ChildExit(code=130))  # an exit code, not a death by SIGINT


def test_explicit_sigint_matches() -> None:
    r = parse_retry_on("signals,SIGINT")
    assert r.matches(ChildExit(signal=SIGINT))


def test_specific_signal_only() -> None:
    r = parse_retry_on("SIGKILL")
    assert r.matches(ChildExit(signal=SIGKILL))
    assert not r.matches(ChildExit(signal=SIGTERM))
    assert not r.matches(ChildExit(code=SIGKILL))  # exit code 9 is not death by signal 9


def test_any_matches_failures_not_success_nor_sigint() -> None:
    r = parse_retry_on("any")
    assert r.matches(ChildExit(code=1))
    assert r.matches(ChildExit(code=255))
    assert r.matches(ChildExit(signal=SIGKILL))
    assert not r.matches(ChildExit(code=0))
    assert not r.matches(ChildExit(signal=SIGINT))


# ---------------------------------------------------------------- decide


def test_decide_success() -> None:
    r = parse_retry_on("any")
    assert decide(ChildExit(code=0), 0, 3, r) is Decision.SUCCESS
    # success wins even when retries are spent
    assert decide(ChildExit(code=0), 5, 3, r) is Decision.SUCCESS


def test_decide_fatal_when_not_matched() -> None:
    r = parse_retry_on(DEFAULT_RETRY_ON)
    assert decide(ChildExit(code=1), 0, 3, r) is Decision.FATAL
    assert decide(ChildExit(signal=SIGINT), 0, 3, r) is Decision.FATAL


def test_decide_retry() -> None:
    r = parse_retry_on(DEFAULT_RETRY_ON)
    assert decide(ChildExit(code=75), 0, 3, r) is Decision.RETRY
    assert decide(ChildExit(signal=SIGKILL), 2, 3, r) is Decision.RETRY


def test_decide_exhausted() -> None:
    r = parse_retry_on(DEFAULT_RETRY_ON)
    assert decide(ChildExit(code=75), 3, 3, r) is Decision.EXHAUSTED
    assert decide(ChildExit(signal=SIGKILL), 0, 0, r) is Decision.EXHAUSTED


def test_decide_fatal_beats_exhausted() -> None:
    r = parse_retry_on(DEFAULT_RETRY_ON)
    assert decide(ChildExit(code=2), 3, 3, r) is Decision.FATAL


# ---------------------------------------------------------------- Backoff


class _FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("retry", "base"), [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (50, 60.0)]
)
def test_backoff_delay_bounds(retry: int, base: float) -> None:
    b = Backoff(1.0, 60.0)
    assert b.delay(retry, _FixedRandom(0.0)) == pytest.approx(base / 2)
    high = b.delay(retry, _FixedRandom(0.999999))
    assert base / 2 < high <= base
    assert high == pytest.approx(base, rel=1e-5)
    rng = random.Random(retry)
    for _ in range(200):
        d = b.delay(retry, rng)
        assert base / 2 <= d <= base


def test_backoff_capped() -> None:
    b = Backoff(5.0, 7.0)
    rng = random.Random(1)
    for retry in range(1, 30):
        assert b.delay(retry, rng) <= 7.0
    assert b.delay(3, _FixedRandom(0.0)) == pytest.approx(3.5)


@pytest.mark.parametrize("retry", [1024, 1025, 5000, 10**6])
def test_backoff_many_retries_stays_capped(retry: int) -> None:
    """--retries has no upper bound: the thousandth retry waits the cap, it does
    not overflow computing initial * 2**(n-1)."""
    b = Backoff(1.0, 60.0)
    assert b.delay(retry, _FixedRandom(0.0)) == pytest.approx(30.0)
    assert 30.0 <= b.delay(retry, random.Random(retry)) <= 60.0


def test_backoff_deterministic_with_seeded_rng() -> None:
    b = Backoff(1.0, 60.0)
    first = [b.delay(n, random.Random(1234)) for n in range(1, 10)]
    second = [b.delay(n, random.Random(1234)) for n in range(1, 10)]
    assert first == second
    other = [b.delay(n, random.Random(4321)) for n in range(1, 10)]
    assert first != other


def test_backoff_zero_is_no_wait() -> None:
    assert Backoff(0.0, 60.0).delay(5, random.Random(0)) == 0.0
    assert Backoff(0.0, 0.0).delay(1) == 0.0


# ---------------------------------------------------------------- parse_backoff


@pytest.mark.parametrize(
    ("spec", "initial", "cap"),
    [
        ("1:60", 1.0, 60.0),
        ("0", 0.0, 60.0),
        ("2", 2.0, 60.0),
        ("0.5:10", 0.5, 10.0),
        ("120", 120.0, 120.0),  # the cap is never below the initial delay
        ("3:3", 3.0, 3.0),
    ],
)
def test_parse_backoff(spec: str, initial: float, cap: float) -> None:
    assert parse_backoff(spec) == Backoff(initial, cap)


@pytest.mark.parametrize("spec", ["", "x", "1:x", "1:", ":5", "-1", "10:5", "1:60:3", "-1:-1"])
def test_parse_backoff_errors(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_backoff(spec)


@pytest.mark.parametrize("spec", ["nan", "1:nan", "inf", "inf:inf"])
def test_parse_backoff_rejects_non_finite(spec: str) -> None:
    """NaN compares false with everything, so it slips past `initial < 0 or cap < initial`;
    an infinite initial delay makes delay() return inf/nan (time.sleep then fails)."""
    with pytest.raises(ConfigError):
        parse_backoff(spec)


# ---------------------------------------------------------------- ChildExit


def _wait_status(code: str) -> int:
    pid = os.posix_spawn(sys.executable, [sys.executable, "-S", "-c", code], dict(os.environ))
    waited, status = os.waitpid(pid, 0)
    assert waited == pid
    return status


def test_from_wait_status_exit_code() -> None:
    ex = ChildExit.from_wait_status(_wait_status("import sys; sys.exit(3)"))
    assert ex == ChildExit(code=3)
    assert ex.status == 3
    assert "3" in ex.describe()


def test_from_wait_status_exit_zero() -> None:
    ex = ChildExit.from_wait_status(_wait_status("pass"))
    assert ex == ChildExit(code=0)
    assert ex.status == 0


def test_from_wait_status_killed_by_sigkill() -> None:
    ex = ChildExit.from_wait_status(
        _wait_status("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    )
    assert ex == ChildExit(signal=SIGKILL)
    assert ex.code is None
    assert ex.status == 128 + SIGKILL == 137
    assert "SIGKILL" in ex.describe()


def test_status_shell_convention() -> None:
    assert ChildExit(code=3).status == 3
    assert ChildExit(signal=SIGTERM).status == 143
    assert ChildExit().status == 0
