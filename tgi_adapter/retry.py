"""Retry and timeout policy as immutable values, with pure delay arithmetic.

Nothing here sleeps or reads a clock: callers pass ``now`` and a random
source, and the driver (the stream's reader, the control calls) does the
waiting. That keeps every delay testable to the exact value.
"""

from __future__ import annotations

import email.utils
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

__all__ = ["Timeouts", "RetryPolicy", "parse_retry_after", "retry_after_ms_from_headers"]


def _positive(owner: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}.{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive number of seconds, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Timeouts:
    """How long each phase may take, in seconds.

    :param connect: TCP (and TLS) connection set-up.
    :param control: a whole control call (``/health``, ``/info``, ``/metrics``),
        retries included.
    :param first_token: from sending a task to its first data frame (queue
        wait and prefill).
    :param token_idle: between two data frames; TGI's keep-alive comments
        (every 15 s) are not progress.
    """

    connect: float = 5.0
    control: float = 10.0
    first_token: float = 120.0
    token_idle: float = 30.0

    def __post_init__(self) -> None:
        for name in ("connect", "control", "first_token", "token_idle"):
            object.__setattr__(self, name, _positive("Timeouts", name, getattr(self, name)))


@dataclass(frozen=True)
class RetryPolicy:
    """Capped full-jitter retries for failures that happen before ``started``.

    ``attempts`` counts every try, the first included. After the ``n``-th
    failed try (``n`` = 0 for the first) the wait is
    ``uniform(0, min(cap, base * multiplier ** n))``. A ``Retry-After`` from
    the engine or a proxy replaces the jitter when it is at most
    ``retry_after_cap``; a longer one means no retry, and the error carries
    the value so the orchestrator can reschedule. No wait ever ends past the
    task's deadline.
    """

    attempts: int = 4
    base: float = 0.1
    multiplier: float = 2.0
    cap: float = 2.0
    retry_after_cap: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(
                f"RetryPolicy.attempts must be an integer >= 1 (it counts the first try), got {self.attempts!r}"
            )
        for name in ("base", "cap", "retry_after_cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"RetryPolicy.{name} must be a number of seconds >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        m = self.multiplier
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 1:
            raise ValueError(f"RetryPolicy.multiplier must be a number >= 1, got {m!r}")
        object.__setattr__(self, "multiplier", float(m))

    def backoff_ceiling(self, failed_tries: int) -> float:
        """The upper bound of the jittered wait after ``failed_tries`` + 1 failures."""
        try:
            ceiling = self.base * self.multiplier**failed_tries
        except OverflowError:
            return 0.0 if self.base == 0 else self.cap
        return min(self.cap, ceiling)

    def next_delay(
        self,
        failed_tries: int,
        *,
        retriable: bool,
        retry_after_s: Optional[float],
        now: float,
        deadline: Optional[float],
        rng: Callable[[], float],
    ) -> Optional[float]:
        """How long to wait before the next try, or ``None`` for no retry.

        :param failed_tries: tries that have failed so far, minus one (0 after
            the first failure).
        :param retry_after_s: the server's ``Retry-After``, if any.
        :param now: the current monotonic time.
        :param deadline: the monotonic time the task must end by, if any.
        :param rng: returns a float in [0, 1).
        """
        if not retriable or failed_tries + 1 >= self.attempts:
            return None
        if retry_after_s is not None:
            if retry_after_s > self.retry_after_cap:
                return None
            delay = max(0.0, retry_after_s)
        else:
            delay = rng() * self.backoff_ceiling(failed_tries)
        if deadline is not None and now + delay >= deadline:
            return None
        return delay


def parse_retry_after(value: str, now_epoch: float) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date).

    Returns ``None`` for a value that is neither; a date in the past is 0.
    """
    value = value.strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return float(int(value))
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:  # pragma: no cover - older Pythons returned None
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_epoch)


def retry_after_ms_from_headers(headers: Mapping[str, str], now_epoch: float) -> Optional[int]:
    """``retry-after-ms`` if present and valid, else ``Retry-After``, in milliseconds."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            ms = float(raw_ms.strip())
        except ValueError:
            ms = math.nan
        if math.isfinite(ms) and ms >= 0:
            return int(math.ceil(ms))
    raw = headers.get("retry-after")
    if raw is None:
        return None
    seconds = parse_retry_after(raw, now_epoch)
    return None if seconds is None else int(math.ceil(seconds * 1000))
