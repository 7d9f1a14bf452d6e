"""Restart policy: which child exits are retried, and how long to back off.

Pure functions and small frozen dataclasses; no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
import signal

from ckpt._contract import ExitCode
from ckpt_cli.errors import ConfigError

#: The documented default of --retry-on: exit code 75 (EX_TEMPFAIL, what
#: ckpt.RecoverableError exits with) and death by any signal except SIGINT
#: (OOM kill, a stray SIGKILL or SIGSEGV are worth a retry; Ctrl-C is not).
DEFAULT_RETRY_ON = "75,signals"


@dataclasses.dataclass(frozen=True)
class ChildExit:
    """How the child ended: exit code, or the signal that killed it."""

    code: int | None = None
    signal: int | None = None

    @classmethod
    def from_wait_status(cls, status: int) -> ChildExit:
        import os

        if os.WIFSIGNALED(status):
            return cls(signal=os.WTERMSIG(status))
        return cls(code=os.waitstatus_to_exitcode(status))

    @property
    def status(self) -> int:
        """Shell convention: the exit code, or 128+N for death by signal N."""
        if self.signal is not None:
            return 128 + self.signal
        return self.code or 0

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by {signal_name(self.signal)}"
        return f"exit code {self.code}"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def parse_signal(token: str) -> int:
    name = token.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ConfigError(f"unknown signal {token!r}") from None


@dataclasses.dataclass(frozen=True)
class RetryOn:
    codes: frozenset[int] = frozenset()
    signals: frozenset[int] = frozenset()
    any_signal: bool = False  # every signal except SIGINT
    any_code: bool = False  # every non-zero exit code

    def matches(self, ex: ChildExit) -> bool:
        if ex.signal is not None:
            return ex.signal in self.signals or (self.any_signal and ex.signal != signal.SIGINT)
        return ex.code in self.codes or (self.any_code and ex.code not in (0, None))


def parse_retry_on(spec: str) -> RetryOn:
    """'75,signals' / '1,75,SIGKILL' / 'any' / 'none' -> RetryOn.

    Tokens: an exit code 1-255; a signal name (SIGKILL or KILL); `signals` for
    death by any signal but SIGINT; `any` for every failure; `default` for
    the default set; `none` for nothing.
    """
    codes: set[int] = set()
    sigs: set[int] = set()
    any_signal = any_code = False
    for raw in spec.replace(" ", ",").split(","):
        token = raw.strip()
        if not token:
            continue
        low = token.lower()
        if low == "none":
            continue
        if low == "default":
            d = parse_retry_on(DEFAULT_RETRY_ON)
            codes |= d.codes
            sigs |= d.signals
            any_signal = any_signal or d.any_signal
        elif low == "signals":
            any_signal = True
        elif low == "any":
            any_signal = any_code = True
        elif token.isdigit():
            code = int(token)
            if not 1 <= code <= 255:
                raise ConfigError(f"exit code {code} in --retry-on is not between 1 and 255")
            codes.add(code)
        else:
            try:
                sigs.add(parse_signal(token))
            except ConfigError:
                raise ConfigError(
                    f"{token!r} in --retry-on is neither an exit code, a signal name, "
                    "'signals', 'any' nor 'none'"
                ) from None
    return RetryOn(frozenset(codes), frozenset(sigs), any_signal, any_code)


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Exponential backoff with equal jitter: the n-th retry waits between half
    and all of min(cap, initial * 2**(n-1)) seconds."""

    initial: float = 1.0
    cap: float = 60.0

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        if self.initial <= 0:
            return 0.0
        base = min(self.cap, self.initial * 2.0 ** min(max(0, retry - 1), 64))
        r: float = (rng or random).random()
        return base / 2 + r * base / 2


def parse_backoff(spec: str) -> Backoff:
    """'INITIAL[:CAP]' seconds, e.g. '1:60' (the default) or '0' for none."""
    first, sep, second = spec.partition(":")
    try:
        initial = float(first)
        cap = float(second) if sep else max(60.0, initial)
    except ValueError:
        raise ConfigError(
            f"--backoff {spec!r} is not INITIAL[:MAX] in seconds (e.g. 1:60)"
        ) from None
    if not (math.isfinite(initial) and math.isfinite(cap)) or initial < 0 or cap < initial:
        raise ConfigError(f"--backoff {spec!r}: need 0 <= INITIAL <= MAX")
    return Backoff(initial, cap)


class Decision(enum.Enum):
    SUCCESS = "success"
    RETRY = "retry"
    FATAL = "fatal"
    EXHAUSTED = "retries spent"


def decide(ex: ChildExit, retries_used: int, retries: int, retry_on: RetryOn) -> Decision:
    if ex.signal is None and ex.code == ExitCode.OK:
        return Decision.SUCCESS
    if not retry_on.matches(ex):
        return Decision.FATAL
    if retries_used >= retries:
        return Decision.EXHAUSTED
    return Decision.RETRY
